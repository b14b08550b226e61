"""Recovery fine-tuning after removing half the KV groups of builtin:tiny-llama, at one step budget.

No recovery vs LoRA vs full vs distill (all 50 optimizer steps of 8 x 128 tokens, lr per method),
same pruned starting point (taylor, reconstruct none, so that recovery has something to do, and
with least-squares repair for reference), same held-out tokens, wall time per method.

    python -m benchmarks.recovery
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks.common import context, table, write_result
from benchmarks.quality import Bench
from gqaprune.recipe import HeadPruneStage, RecoverStage
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.recover import Recover

STEPS = 50
METHODS = {"lora": 1e-3, "full": 3e-4, "distill": 3e-4}


def main():
    torch.set_num_threads(1)
    b = Bench("builtin:tiny-llama")
    dense = b.ppl(b.fresh())
    rows = []
    for reconstruct in ("none", "least_squares"):
        teacher = b.fresh()
        model = b.fresh()
        head = {"type": "head_prune", "unit": "group", "prune_ratio": 0.5, "score": "taylor",
                "reconstruct": reconstruct}
        HeadPrune(HeadPruneStage(**head)).apply(context(model, b.calib, head))
        pruned_ppl = b.ppl(model)
        rows.append([reconstruct, "none", 0, pruned_ppl, 0.0])
        for method, lr in METHODS.items():
            m = copy.deepcopy(model)
            stage = {"type": "recover", "method": method, "steps": STEPS, "lr": lr, "batch_size": 8, "seq_len": 128}
            ctx = context(m, b.calib, stage, tokenizer=b.tok)
            ctx.teacher = teacher.eval().requires_grad_(False)
            t = time.perf_counter()
            Recover(RecoverStage(**stage)).apply(ctx)
            rows.append([reconstruct, method, STEPS, b.ppl(ctx.model), time.perf_counter() - t])
            print(rows[-1], flush=True)
    md = (f"## Recovery after removing half the KV groups (builtin:tiny-llama)\n\n"
          f"`python -m benchmarks.recovery` — dense held-out perplexity {dense:.2f}; head_prune group 0.5 by taylor, "
          f"then {STEPS} optimizer steps of 8 x 128 tokens (train split) per method; lr lora {METHODS['lora']}, "
          f"full/distill {METHODS['full']}; distill alpha 1 against the unpruned model; 1 thread.\n\n"
          + table(["head_prune reconstruct", "recover", "steps", "held-out ppl", "seconds"], rows))
    write_result("recovery", md)


if __name__ == "__main__":
    main()
