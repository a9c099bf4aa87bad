"""Markdown tables of a reproduction's verdicts, for the README and docs/results/.

    python scripts/verdict_tables.py results/paper            # summary.json's verdicts
    python scripts/verdict_tables.py results/quick --variants # variants.json's table

Reads only what ``ntklens reproduce`` wrote; computes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.3g}"


def _statistic(cell: dict[str, Any]) -> str:
    value, ci = cell.get("value"), cell.get("ci")
    if value is None:
        return ""
    text = _number(value)
    if ci and None not in ci:
        text += f" [{_number(ci[0])}, {_number(ci[1])}]"
    return text


def _escape(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def verdicts(summary: dict[str, Any]) -> str:
    """One row per verdict of ``summary.json``: claim, family, verdict, statistic, reason."""
    findings = summary["findings"]
    lines = [
        "| claim | family | verdict | statistic | value [CI] | reason |",
        "|---|---|---|---|---|---|",
    ]
    for entry in findings["verdicts"]:
        statistic = entry.get("statistic") or {}
        lines.append(
            "| {} | {} | **{}** | {} | {} | {} |".format(
                findings["claims"].get(entry["claim"], entry["claim"]),
                entry.get("family") or "—",
                entry["verdict"],
                _escape(statistic.get("name")),
                _statistic(statistic),
                _escape(entry.get("reason")),
            )
        )
    return "\n".join(lines)


def variants(table: dict[str, Any]) -> str:
    """claim × variant: each cell the verdict and its statistic with CI."""
    names = [v["name"] for v in table["variants"]]
    head = "| claim | scope | " + " | ".join(names) + " |"
    lines = [head, "|---|---|" + "---|" * len(names)]
    for row in table["rows"]:
        cells = []
        for name in names:
            cell = row["cells"].get(name)
            if cell is None:
                cells.append("—")
                continue
            statistic = _statistic(cell)
            cells.append(f"**{cell['verdict']}**" + (f" {statistic}" if statistic else ""))
        title = table["claims"].get(row["claim"], row["claim"])
        lines.append(f"| {title} | {row['scope']} | " + " | ".join(cells) + " |")
    listing = ["", "| variant | axis | what changes | status |", "|---|---|---|---|"]
    listing += [
        f"| {v['name']} | {v['axis']} | {_escape(v['description'])} | {_escape(v['status'])} |"
        for v in table["variants"]
    ]
    return "\n".join(lines + listing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the --out folder of `ntklens reproduce`")
    parser.add_argument("--variants", action="store_true", help="the variants.json table")
    args = parser.parse_args()
    if args.variants:
        print(variants(json.loads((args.out / "variants.json").read_text())))
    else:
        print(verdicts(json.loads((args.out / "summary.json").read_text())))


if __name__ == "__main__":
    main()
