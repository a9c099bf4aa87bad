"""``python -m ntklens``: the command line, for environments without the console script."""

from ntklens.cli import app

app(prog_name="ntklens")
