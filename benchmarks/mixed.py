"""hidden_prune mixed with MLP pruning on SmolLM2-135M at about 25% and 40% of the parameters removed, with and
without a short distillation, against the same budget taken from the MLP alone and against FLAP, in one run.

Same model, calibration (8 x 256 tokens) and evaluation (the first 4,096 tokens of builtin:pydoc's validation
split, 256-token windows) as benchmarks/real.py. Every gqaprune row repairs by least squares (held-out choice of
damping, the default); the MLP is pruned by Taylor with global allocation (the best MLP-only setting at 25% in
benchmarks/repair.py); hidden_prune scores by activation without rotation (rotation unties SmolLM2's tied head:
+49152 x width parameters, more than these budgets leave). Widths are chosen so each row removes within about one
point of its budget; the table gives what each removed. The distilled rows add `recover: distill` (20 steps of
4 x 256 tokens from the calibration source's train split, as recipes/quickstart_recover.yaml) after the same
one-shot stages, with the unpruned model as the teacher.

    python -m benchmarks.mixed                  # every row, resumable; results/mixed.json and mixed.md
    python -m benchmarks.mixed --only "^25%"    # rows whose key matches (the others are kept from the JSON)
    python -m benchmarks.mixed --render
"""

from __future__ import annotations

import copy

from benchmarks.common import RESULTS, table
from benchmarks.real import Bench, flap_row, mlp, run_rows
from gqaprune.context import RunContext
from gqaprune.recipe import Recipe
from gqaprune.stages import STAGES

JSON = RESULTS / "mixed.json"
DISTILL = {"type": "recover", "method": "distill", "steps": 20, "batch_size": 4, "seq_len": 256}


def hidden(keep: int) -> dict:
    return {"type": "hidden_prune", "keep": keep, "align": 64, "score": "activation", "rotate": "none",
            "reconstruct": "least_squares"}


# (budget, label, one-shot stages); hidden 576 -> 512 / 448 then the MLP width that lands on the budget
SETTINGS = [
    ("25%", "MLP 896", [mlp(896, alloc="global")]),
    ("25%", "hidden 512 + MLP 1152", [hidden(512), mlp(1152, alloc="global")]),
    ("25%", "hidden 448 + MLP 1472", [hidden(448), mlp(1472, alloc="global")]),
    ("40%", "MLP 512", [mlp(512, alloc="global")]),
    ("40%", "hidden 512 + MLP 704", [hidden(512), mlp(704, alloc="global")]),
    ("40%", "hidden 448 + MLP 960", [hidden(448), mlp(960, alloc="global")]),
]
FLAP = {"25%": 0.246, "40%": 0.395}


def distill(b: Bench, model, teacher) -> dict:
    recipe = Recipe(model="benchmark", output="unused", seed=0, stages=[DISTILL],
                    calibration={"source": "builtin:pydoc", "samples": b.calib.shape[0], "seq_len": b.calib.shape[1]})
    ctx = RunContext(model=model, adapter=b.adapter, tokenizer=b.tok, recipe=recipe, calib=b.calib,
                     eval_tokens=b.eval_tokens[:4097], progress=False, teacher=teacher)
    return STAGES["recover"](STAGES["recover"].Config(**DISTILL)).apply(ctx)


def _width(model, extra: dict) -> tuple:
    return model, {"hidden_size": model.config.hidden_size, **extra}


def jobs(b: Bench) -> list:
    """(key, budget, build(model) -> (model, extra)), one-shot rows first (a run cut short keeps them)."""
    out = []
    for bud, label, stages in SETTINGS:
        out.append((f"{bud}|{label}", bud, lambda m, s=stages: _width(b.gq(m, s), {})))
    for bud, frac in FLAP.items():
        out.append((f"{bud}|FLAP", bud, lambda m, f=frac: _width(flap_row(f)(b, m), {})))
    for bud, label, stages in SETTINGS:
        def build(m, s=stages):
            teacher = copy.deepcopy(m)
            b.gq(m, s)
            rep = distill(b, m, teacher)
            return _width(m, {"distill_loss_first_last": [rep.get("loss_first"), rep.get("loss_last")]})
        out.append((f"{bud}|{label} + distill", bud, build))
    return out


def main() -> None:
    run_rows("mixed", JSON, jobs, render, "run only rows whose key ('budget|label') matches this regular expression")


def render(res: dict) -> str:
    rows = [[k.split("|")[0], k.split("|")[1], f"{100 * r['removed']:.1f}%", r["hidden_size"], r["ppl"],
             f"x{r['ppl'] / res['dense']:.2f}", r["seconds"]]
            for k, r in sorted(res["rows"].items(), key=lambda kv: (kv[0].split("|")[0], kv[1]["ppl"]))]
    return (f"# hidden_prune in mixed recipes (SmolLM2-135M, dense {res['dense']:.2f})\n\n"
            "Held-out perplexity (4,096 pydoc validation tokens, 256-token windows); calibration 8 x 256 tokens; "
            "`python -m benchmarks.mixed`. Rows sorted by perplexity within a budget.\n\n"
            + table(["budget", "recipe", "removed", "hidden", "perplexity", "x dense", "s"], rows))


if __name__ == "__main__":
    main()
