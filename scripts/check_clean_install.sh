#!/usr/bin/env bash
# Installs ntklens as a user would, into a fresh virtual environment, and checks that it
# starts: build the wheel, install the pinned CPU torch and then the wheel WITHOUT extras,
# run `ntklens --help` and every subcommand's --help, and the README's library example
# (the first ```python block under "## Library", read from README.md itself).
# An import that pyproject.toml does not declare fails here, whatever the dev machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "clean install: building the wheel" >&2
quietly() {  # pip's output only when it fails
  "$@" >>"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; exit 1; }
}
# Build from a copy, so the checkout gets no build/ or *.egg-info.
mkdir "$work/source"
tar -C "$root" --exclude=./.git --exclude=./build --exclude=./dist --exclude=./results \
  --exclude=./.venv --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$work/source" -xf -
quietly "$PYTHON" -m pip wheel --no-deps --wheel-dir "$work/dist" "$work/source"
wheel=$(ls "$work"/dist/ntklens-*.whl)

echo "clean install: fresh venv, torch==2.13.0 (CPU), then $(basename "$wheel")" >&2
"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
quietly "$venv_python" -m pip install "torch==2.13.0"
quietly "$venv_python" -m pip install "$wheel"

cd "$work"  # away from the checkout, so only the installed package can be imported
cli="$work/venv/bin/ntklens"
"$cli" --help >/dev/null
commands=$("$venv_python" -c '
import typer.main
from ntklens.cli import app
print(" ".join(sorted(typer.main.get_command(app).commands)))
')
for command in $commands; do
  "$cli" "$command" --help >/dev/null
done
echo "clean install: ntklens --help and the --help of: $commands" >&2

"$venv_python" - "$root/README.md" >"$work/example.py" <<'EOF'
import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("\n## Library\n", 1)
if len(section) != 2:
    sys.exit("README.md has no '## Library' section")
block = re.search(r"^```python\n(.*?)^```", section[1], flags=re.S | re.M)
if block is None:
    sys.exit("README.md's Library section has no ```python block")
print(block.group(1))
EOF
"$venv_python" "$work/example.py" >/dev/null
echo "clean install: README library example ran" >&2
