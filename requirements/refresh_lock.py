"""Write requirements/lock.txt: every package `make setup` (and so CI) installs, pinned.

Run through `make lock`, which builds a throw-away virtual environment with today's newest
releases of qcompile's dependencies (torch pinned to the CPU build of TORCH_VERSION) and
calls this script with that environment's Python. The package's own dependency ranges in
pyproject.toml stay open for users; the lock is what the project is tested with.
"""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parent / "lock.txt"


def main() -> None:
    python = sys.argv[1]
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.splitlines()
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    pins = []
    for line in frozen:
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e "):
            continue
        name, sep, ver = line.partition("==")
        if not sep:
            raise SystemExit(f"refresh_lock: unexpected `pip freeze` line {line!r} (not name==version)")
        # torch's local label (+cpu) names the index's build, not a version: `torch==2.13.0`
        # matches the CPU build that `make setup` installs.
        pins.append(f"{name}=={ver.split('+')[0]}")
    header = [
        "# The exact set `make setup` installs (and so CI): refresh with `make lock`.",
        f"# Made {datetime.date.today().isoformat()} with Python {version}: the newest releases that pass `make test`.",
    ]
    LOCK.write_text("\n".join(header + sorted(pins, key=str.lower)) + "\n")
    print(f"wrote {LOCK} ({len(pins)} packages)")


if __name__ == "__main__":
    main()
