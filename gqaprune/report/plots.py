"""Plots of a run (matplotlib, headless): layer scores, head-group importance, widths, perplexity per stage."""

from __future__ import annotations

from pathlib import Path

from gqaprune.stages import STAGES


MAX_LABELLED_TICKS = 16  # beyond this many categories only every 2nd (3rd, ...) one is labelled


def integer_ticks(axis, count: int) -> None:
    """Ticks at whole category indices 0..count-1 (layer, KV group, query head): every one when few, every
    ``step``-th when many."""
    step = -(-count // MAX_LABELLED_TICKS)  # ceil: at most MAX_LABELLED_TICKS labels
    axis.set_ticks(range(0, count, step))


def write_plots(report: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100, metadata={"Software": None})  # no timestamps: reproducible bytes
        plt.close(fig)
        written.append(name)

    for s in report["stages"]:
        figure = STAGES[s["type"]].plot(s, plt)  # (figure, file name) or None
        if figure is not None:
            save(*figure)

    plan = report.get("plan") or []
    if plan:
        src = plan[0]["per_layer"]
        fin = report["shapes_after"]["per_layer"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        for ax, key, title in ((axes[0], "num_attention_heads", "query heads"), (axes[1], "intermediate_size", "MLP width")):
            ax.plot(range(len(src)), [s[key] for s in src], "o-", label="before")
            ax.plot(range(len(fin)), [s[key] for s in fin], "s-", label="after")
            integer_ticks(ax.xaxis, max(len(src), len(fin)))
            ax.set_xlabel("layer")
            ax.set_title(title)
            ax.legend()
        save(fig, "widths_per_layer.png")

    ppl = [("before", report["eval"]["before"].get("perplexity"))]
    ppl += [(f"{s['index']}:{s['type']}", s.get("perplexity_after")) for s in report["stages"]]
    ppl.append(("reloaded", report["eval"]["after"].get("perplexity")))
    ppl = [(k, v) for k, v in ppl if v is not None]
    if len(ppl) > 1:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([k for k, _ in ppl], [v for _, v in ppl], "o-")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("perplexity after each stage")
        ax.tick_params(axis="x", rotation=30)
        save(fig, "perplexity_per_stage.png")
    report["plots"] = written
    return written
