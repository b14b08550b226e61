"""Run every benchmark and collect their results into benchmarks/RESULTS.md.

    pip install -r benchmarks/requirements.txt   # peer tools (Torch-Pruning)
    python -m benchmarks.run_all                  # quality, speed, scale (about 1.5 h on 2 cores)
    python -m benchmarks.run_all --collect        # only rebuild RESULTS.md from benchmarks/results/*.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["quality", "groups", "recovery", "speed", "scale"]


def collect() -> None:
    parts = ["# Benchmark results", "",
             "Produced by `python -m benchmarks.run_all` (each section names its own command). Numbers are from the "
             "last run on the project's 2-core CPU machine; every comparison in a table was measured in one run.", ""]
    for name in ORDER + sorted(p.stem for p in (HERE / "results").glob("*.md") if p.stem not in ORDER):
        path = HERE / "results" / f"{name}.md"
        if path.exists():
            parts += [path.read_text().rstrip(), ""]
        else:
            parts += [f"## {name}", "", f"Not run yet: `python -m benchmarks.{name}`.", ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--collect", action="store_true")
    args = ap.parse_args()
    if not args.collect:
        for name in ORDER:
            subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], check=True, cwd=HERE.parent)
    collect()


if __name__ == "__main__":
    main()
