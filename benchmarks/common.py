"""Shared helpers for the benchmarks: build a RunContext around a model, time things, write markdown."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from gqaprune.arch.adapter import resolve_adapter
from gqaprune.context import RunContext
from gqaprune.recipe import Recipe

RESULTS = Path(__file__).parent / "results"


def context(model, calib: torch.Tensor, stage: dict, tokenizer=None, eval_tokens=None, sequential=False,
            batch_size=8, seed=0) -> RunContext:
    recipe = Recipe(model="benchmark", output="unused", seed=seed, stages=[stage],
                    calibration={"sequential": sequential, "batch_size": batch_size,
                                 "samples": calib.shape[0], "seq_len": calib.shape[1]})
    return RunContext(model=model, adapter=resolve_adapter("auto", model.config.architectures), tokenizer=tokenizer,
                      recipe=recipe, calib=calib, eval_tokens=eval_tokens, progress=False)


def median_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rss_mb() -> float:
    """This process's resident set size now, in MiB (VmRSS; the peak so far where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_result(name: str, markdown: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    print(markdown)
    return path


def table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def resumable(path: Path) -> tuple[dict, Callable[[], None]]:
    """(the results stored at ``path``, or a fresh {"rows": {}}; save(), which replaces the file whole): a
    benchmark that stops keeps the rows it finished, and a rerun skips them."""
    res = json.loads(path.read_text()) if path.exists() else {"rows": {}}

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)  # nothing half-written

    return res, save
