"""Whole-group pruning where there is a choice: a tiny Llama with 4 KV groups per layer.

The builtin models have 2 KV heads per layer, so removing half the groups leaves one choice per
layer and global allocation nothing to allocate. This benchmark trains, the way the builtins are
trained (same tokenizer, corpus, steps and settings), a Llama of the same size with 16 query
heads over 4 KV heads (head_dim 24, hidden 384, 4 layers), then removes half and three quarters
of the KV groups with every score (random over 5 seeds), uniform, global and by_layer_importance
allocation, with and without least-squares repair; Torch-Pruning 1.6.1 at half the query heads per group (its most: it
never removes KV heads) for reference. Held-out builtin:pydoc perplexity, no recovery.

    python -m benchmarks.groups      # trains the model (~3 min on 2 cores), then ~10 min of pruning
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import table, write_result
from benchmarks.quality import Bench
from gqaprune.builtin.tiny import (TRAIN_SETTINGS, build_config, cache_dir, load_builtin_tokenizer, model_recipe,
                                     recipe_key, train_model)

SCORES = ["taylor", "magnitude", "activation", "reconstruction", "ablation", "truncate"]
RANDOM_SEEDS = range(5)
BUDGETS = {"G50": {"unit": "group", "prune_ratio": 0.5}, "G75": {"unit": "group", "prune_ratio": 0.75}}
RESULTS = Path(__file__).parent / "results"


SHAPE = {"num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 24}


def trained_folder() -> tuple[Path, float]:
    """The 16 Q / 4 KV tiny Llama, trained once like the builtins and cached beside them."""
    key = recipe_key({**model_recipe("builtin:tiny-llama"), "shape": SHAPE})
    folder = cache_dir() / f"bench-tiny-llama-16q4kv-{key}"
    if (folder / "train_seconds.json").exists():
        return folder, json.loads((folder / "train_seconds.json").read_text())
    tok = load_builtin_tokenizer(progress=False)
    cfg = build_config("builtin:tiny-llama", tok)
    for k, v in SHAPE.items():
        setattr(cfg, k, v)
    model, seconds = train_model("tiny-llama-16q4kv", tok, TRAIN_SETTINGS, progress=True, config=cfg)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "train_seconds.json").write_text(json.dumps(seconds))
    tmp.rename(folder)
    return folder, seconds


def main():
    torch.set_num_threads(2)  # training
    t0 = time.perf_counter()
    folder, train_s = trained_folder()
    torch.set_num_threads(1)  # tiny models: one thread is faster
    b = Bench("tiny-llama-16q4kv", folder=folder)
    params = sum(p.numel() for p in b.fresh().parameters())
    r = {"dense": b.ppl(b.fresh()), "train_seconds": train_s, "params": params, "rows": {}}
    print("dense", r["dense"], flush=True)
    for bud, spec in BUDGETS.items():
        for score in SCORES:
            for alloc in ("uniform", "global") if score not in ("random", "truncate") else ("uniform",):
                for rec in ("none", "least_squares"):
                    r["rows"][f"{bud}|{score}|{rec}|{alloc}"] = b.heads(spec, score, rec, alloc)
        for rec in ("none", "least_squares"):
            r["rows"][f"{bud}|taylor|{rec}|by_layer_importance"] = b.heads(spec, "taylor", rec, "by_layer_importance")
            runs = [b.heads(spec, "random", rec, seed=seed) for seed in RANDOM_SEEDS]
            r["rows"][f"{bud}|random ({len(runs)} seeds: mean, min-max)|{rec}|uniform"] = (
                f"{sum(runs) / len(runs):.2f} ({min(runs):.2f}-{max(runs):.2f})")
        print(bud, {k: v for k, v in r["rows"].items() if k.startswith(bud)}, flush=True)
    for imp in ("magnitude", "taylor"):
        r["rows"][f"Q50|Torch-Pruning {imp}|-|uniform"] = b.torch_pruning("heads", 0.5, imp)
    r["seconds"] = time.perf_counter() - t0
    (RESULTS / "groups.json").write_text(json.dumps(r, indent=2))
    write_result("groups", render(r))


def render_saved() -> None:
    write_result("groups", render(json.loads((RESULTS / "groups.json").read_text())))


def render(r: dict) -> str:
    def ppl(v):
        return v if isinstance(v, str) else round(v, 2)

    out = ["## Whole groups with a choice: tiny Llama, 16 query heads over 4 KV heads", "",
           f"`python -m benchmarks.groups` — trained like the builtins ({r['params']:,} parameters, "
           f"{r['train_seconds']:.0f} s), dense held-out perplexity {r['dense']:.2f}; calibration 64 x 128 tokens; "
           f"no recovery; {r['seconds'] / 60:.1f} min in all. G50 keeps 2 of 4 groups per layer on average, "
           "G75 keeps 1; global and by_layer_importance keep at least 1 group in every layer. Torch-Pruning "
           "never removes KV heads: its row removes half the query heads of every group (2 of 4 KV-group "
           "worth of q/o parameters, none of k/v), fewer parameters than G50.", ""]
    order = SCORES + ["random", "Torch-Pruning"]

    def key(k: str):  # budget, then score, none before least_squares, then allocation
        bud, score, rec, alloc = k.split("|")
        first = next((i for i, name in enumerate(order) if score.startswith(name)), len(order))
        return bud, first, rec != "none", ["uniform", "global", "by_layer_importance"].index(alloc)

    rows = []
    for k in sorted(r["rows"], key=key):
        bud, score, rec, alloc = k.split("|")
        rows.append([bud, score, rec, alloc, ppl(r["rows"][k])])
    out += [table(["budget", "score", "reconstruct", "allocation", "perplexity"], rows), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
