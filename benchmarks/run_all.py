"""Run the core benchmarks and collect every rendered table into benchmarks/results/ALL.md.

    pip install -r benchmarks/requirements.txt   # peer tools (Torch-Pruning)
    python -m benchmarks.run_all                  # quality, groups, recovery, speed, scale (about 1.5 h on 2 cores)
    python -m benchmarks.run_all --collect        # only rebuild results/ALL.md from benchmarks/results/*.md

benchmarks/RESULTS.md is written by hand from these tables and the other benchmarks' (each section names its
command and commit), with what was learned from them; collecting never overwrites it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["quality", "groups", "recovery", "speed", "scale"]


def collect(results: Path = HERE / "results") -> Path:
    """Concatenate ``results``/*.md (the core benchmarks first) into ``results``/ALL.md; returns its path."""
    parts = ["# Benchmark tables, as rendered", "",
             "Collected by `python -m benchmarks.run_all --collect` from benchmarks/results/*.md; the curated "
             "summary is benchmarks/RESULTS.md.", ""]
    for name in ORDER + sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER and p.stem != "ALL"):
        path = results / f"{name}.md"
        if path.exists():
            parts += [path.read_text().rstrip(), ""]
        else:
            parts += [f"## {name}", "", f"Not run yet: `python -m benchmarks.{name}`.", ""]
    out = results / "ALL.md"
    out.write_text("\n".join(parts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--collect", action="store_true")
    args = ap.parse_args()
    if not args.collect:
        for name in ORDER:
            subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], check=True, cwd=HERE.parent)
    print(f"wrote {collect()}")


if __name__ == "__main__":
    main()
