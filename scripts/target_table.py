#!/usr/bin/env python3
"""Write the README's target table from the catalog (kiln.execution); ``--check`` only compares."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.execution import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- target-table:begin (scripts/target_table.py) -->\n", "<!-- target-table:end -->\n"


def render(readme: str) -> str:
    """``readme`` with the table between its markers replaced by the catalog's."""
    head, found, rest = readme.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise SystemExit(f"README.md has no {BEGIN.strip()} ... {END.strip()} block")
    return head + BEGIN + markdown_table() + END + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md's target table is stale: run scripts/target_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
