"""Plots of a run (matplotlib, headless): layer scores, head-group importance, widths, perplexity per stage."""

from __future__ import annotations

from pathlib import Path


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
        if s["type"] == "layer_drop":
            scores = [x if x is not None else float("nan") for x in s["layer_scores"]]
            fig, ax = plt.subplots(figsize=(6, 3))
            colors = ["tab:red" if i in s["dropped_layers"] else "tab:blue" for i in range(len(scores))]
            ax.bar(range(len(scores)), scores, color=colors)
            ax.set_xlabel("layer (before this stage)")
            ax.set_ylabel(s["score"])
            ax.set_title(f"stage {s['index']}: layer scores (red = dropped)")
            save(fig, f"stage{s['index']}_layer_scores.png")
        elif s["type"] == "head_prune":
            import numpy as np

            key = "group_scores" if s["unit"] == "group" else "head_scores"
            rows = [l[key] for l in s["layers"]]
            width = max(len(r) for r in rows)
            mat = np.full((len(rows), width), np.nan)
            for i, r in enumerate(rows):
                mat[i, : len(r)] = r
            fig, ax = plt.subplots(figsize=(6, 0.6 * len(rows) + 1.5))
            im = ax.imshow(mat, aspect="auto", cmap="viridis")
            removed_key = "removed_kv_heads" if s["unit"] == "group" else "removed_q_heads"
            for i, l in enumerate(s["layers"]):
                for j in l[removed_key]:
                    ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=12, fontweight="bold")
            ax.set_xlabel("KV group" if s["unit"] == "group" else "query head")
            ax.set_ylabel("layer")
            ax.set_title(f"stage {s['index']}: {s['score']} importance (x = removed)")
            fig.colorbar(im, ax=ax)
            save(fig, f"stage{s['index']}_head_importance.png")

    plan = report.get("plan") or []
    if plan:
        src = plan[0]["per_layer"]
        fin = report["shapes_after"]["per_layer"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        for ax, key, title in ((axes[0], "num_attention_heads", "query heads"), (axes[1], "intermediate_size", "MLP width")):
            ax.plot(range(len(src)), [s[key] for s in src], "o-", label="before")
            ax.plot(range(len(fin)), [s[key] for s in fin], "s-", label="after")
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
