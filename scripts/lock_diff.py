"""Print the packages whose locked version differs between two uv lock files, as a Markdown table.

Usage: python scripts/lock_diff.py OLD.lock NEW.lock (used by scripts/upgrade-check.sh; standard library only, so
it runs with the system Python before any venv exists).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def pins(path: Path) -> dict[str, set[str]]:
    """Package name -> locked versions (a universal lock may pin two versions behind Python-version markers)."""
    found: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            found.setdefault(match.group(1).lower(), set()).add(match.group(2))
    return found


def diff_table(old: dict[str, set[str]], new: dict[str, set[str]]) -> str:
    rows = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name, set()), new.get(name, set())
        if before != after:
            locked, newest = ", ".join(sorted(before)) or "(absent)", ", ".join(sorted(after)) or "(gone)"
            rows.append(f"| {name} | {locked} | {newest} |")
    if not rows:
        return "(none: the lock already has the newest admitted releases)"
    return "\n".join(["| package | locked | newest |", "|---|---|---|", *rows])


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    print(diff_table(pins(Path(argv[1])), pins(Path(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
