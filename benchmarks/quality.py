"""One-shot quality of head and neuron pruning on the builtin models, side by side in one run.

For each builtin model (tiny-llama, tiny-qwen2, tiny-phi3): held-out builtin:pydoc perplexity
after removing half the KV groups (G50), 1 and 2 of 4 query heads per group (Q25, Q50), and
25% / 50% of MLP channels (N25, N50), with every score, with and without least-squares
reconstruction, independent vs sequential calibration, and Torch-Pruning 1.6.1 where it can
reach the budget (it removes query heads, never KV heads). Same calibration windows (64 x 128
tokens of the train split, seed 0) and same evaluation tokens for every row. No recovery.

    python -m benchmarks.quality            # all three models (~30-40 min on 2 cores)
    python -m benchmarks.quality --models builtin:tiny-llama
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import context, table, write_result
from gqaprune.builtin_models import BUILTIN_MODELS, resolve_builtin
from gqaprune.checkpoint import load_pretrained
from gqaprune.data import calibration_windows, token_stream
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.recipe import HeadPruneStage, NeuronPruneStage
from gqaprune.sources import load_tokenizer
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.neuron_prune import NeuronPrune

HEAD_BUDGETS = {
    "G50": {"unit": "group", "prune_ratio": 0.5},
    "Q25": {"unit": "query_head", "prune_ratio": 0.25},
    "Q50": {"unit": "query_head", "prune_ratio": 0.5},
}
HEAD_SCORES = ["taylor", "magnitude", "activation", "reconstruction", "random", "truncate"]
NEURON_BUDGETS = {"N25": 0.25, "N50": 0.5}
NEURON_SCORES = ["taylor", "magnitude", "activation", "reconstruction", "random"]


class Bench:
    def __init__(self, name: str):
        self.name = name
        self.folder = resolve_builtin(name)
        self.tok = load_tokenizer(self.folder)
        self.calib = calibration_windows(self.tok, "builtin:pydoc", "train", 64, 128, seed=0)
        self.eval_tokens = token_stream(self.tok, "builtin:pydoc", "validation")

    def fresh(self):
        return load_pretrained(self.folder).eval()

    def ppl(self, model) -> float:
        return perplexity(model, self.eval_tokens, 128, None, 16, progress=False)["perplexity"]

    def heads(self, budget: dict, score: str, reconstruct: str, allocation="uniform", sequential=False) -> float:
        model = self.fresh()
        stage = {"type": "head_prune", "score": score, "reconstruct": reconstruct, "allocation": allocation, **budget}
        HeadPrune(HeadPruneStage(**stage)).apply(context(model, self.calib, stage, sequential=sequential))
        return self.ppl(model)

    def neurons(self, ratio: float, score: str, reconstruct: str, sequential=False, allocation="uniform") -> float:
        model = self.fresh()
        stage = {"type": "neuron_prune", "prune_ratio": ratio, "score": score, "reconstruct": reconstruct,
                 "align": 64, "allocation": allocation}
        NeuronPrune(NeuronPruneStage(**stage)).apply(context(model, self.calib, stage, sequential=sequential))
        return self.ppl(model)

    def torch_pruning(self, kind: str, ratio: float, importance: str):
        try:
            from benchmarks.peers import torch_pruning_baseline as tpb
        except ImportError:
            return "not installed"
        if not tpb.available():
            return "not installed"
        model = self.fresh()
        try:
            fn = tpb.tp_prune_attention if kind == "heads" else tpb.tp_prune_mlp
            fn(model, self.calib, ratio, importance)
        except NotImplementedError as e:
            return f"cannot ({str(e)[:40]})"
        return self.ppl(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(BUILTIN_MODELS))
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is faster and immune to other load on the machine
    t0 = time.perf_counter()
    results: dict = {}
    for name in args.models:
        b = Bench(name)
        r = results[name] = {"dense": b.ppl(b.fresh()), "heads": {}, "neurons": {}, "tp": {}}
        print(name, "dense", r["dense"], flush=True)
        for bud, spec in HEAD_BUDGETS.items():
            for score in HEAD_SCORES:
                for rec in ("none", "least_squares"):
                    r["heads"][f"{bud}|{score}|{rec}|uniform|indep"] = b.heads(spec, score, rec)
            for rec in ("none", "least_squares"):
                r["heads"][f"{bud}|taylor|{rec}|global|indep"] = b.heads(spec, "taylor", rec, "global")
            r["heads"][f"{bud}|taylor|least_squares|uniform|seq"] = b.heads(spec, "taylor", "least_squares",
                                                                          sequential=True)
            print(name, bud, {k: round(v, 2) for k, v in r["heads"].items() if k.startswith(bud)}, flush=True)
        for bud, ratio in NEURON_BUDGETS.items():
            for score in NEURON_SCORES:
                for rec in ("none", "least_squares"):
                    r["neurons"][f"{bud}|{score}|{rec}|uniform|indep"] = b.neurons(ratio, score, rec)
            r["neurons"][f"{bud}|taylor|least_squares|uniform|seq"] = b.neurons(ratio, "taylor", "least_squares",
                                                                              sequential=True)
            print(name, bud, {k: round(v, 2) for k, v in r["neurons"].items() if k.startswith(bud)}, flush=True)
        for imp in ("magnitude", "taylor"):
            for bud, ratio in (("Q25", 0.25), ("Q50", 0.5)):
                r["tp"][f"{bud}|{imp}"] = b.torch_pruning("heads", ratio, imp)
            for bud, ratio in NEURON_BUDGETS.items():
                r["tp"][f"{bud}|{imp}"] = b.torch_pruning("mlp", ratio, imp)
        print(name, "tp", r["tp"], flush=True)
        # written after every model, so a long run leaves its finished part behind
        (__import__("pathlib").Path(__file__).parent / "results" / "quality.json").write_text(
            json.dumps(results, indent=2, sort_keys=True))
        write_result("quality", render(results, time.perf_counter() - t0))


def render(results: dict, seconds: float) -> str:
    models = list(results)
    short = [m.removeprefix("builtin:") for m in models]
    out = ["## One-shot quality: held-out builtin:pydoc perplexity (lower is better)", "",
           "`python -m benchmarks.quality` — no recovery; calibration 64 x 128 tokens (train split, seed 0); "
           f"evaluation on the whole validation split; total {seconds / 60:.1f} min on this machine.", "",
           "Dense: " + ", ".join(f"{s} {results[m]['dense']:.2f}" for s, m in zip(short, models)), ""]

    def ppl(v):
        return v if isinstance(v, str) else round(v, 2)

    for bud, spec in HEAD_BUDGETS.items():
        out += [f"### Heads {bud}: {spec['unit']}, prune_ratio {spec['prune_ratio']}", ""]
        rows = []
        keys = [k for k in results[models[0]]["heads"] if k.startswith(bud + "|")]
        for k in keys:
            _, score, rec, alloc, mode = k.split("|")
            rows.append([score, rec, alloc, "sequential" if mode == "seq" else "independent"]
                        + [ppl(results[m]["heads"][k]) for m in models])
        tp_rows = {"Q25": "Q25", "Q50": "Q50", "G50": "Q50"}
        for imp in ("magnitude", "taylor"):
            tk = f"{tp_rows[bud]}|{imp}"
            label = f"Torch-Pruning {imp}" + ("" if bud != "G50" else " at Q50 (its maximum: it never removes KV "
                                                                      "heads; fewer parameters removed than G50)")
            rows.append([label, "-", "uniform", "-"] + [ppl(results[m]["tp"].get(tk, "n/a")) for m in models])
        out += [table(["score", "reconstruct", "allocation", "calibration"] + short, rows), ""]
    for bud, ratio in NEURON_BUDGETS.items():
        out += [f"### MLP channels {bud}: prune_ratio {ratio}, align 64", ""]
        rows = []
        for k in [k for k in results[models[0]]["neurons"] if k.startswith(bud + "|")]:
            _, score, rec, alloc, mode = k.split("|")
            rows.append([score, rec, "sequential" if mode == "seq" else "independent"]
                        + [ppl(results[m]["neurons"][k]) for m in models])
        for imp in ("magnitude", "taylor"):
            rows.append([f"Torch-Pruning {imp}", "-", "-"] + [ppl(results[m]["tp"].get(f"{bud}|{imp}", "n/a"))
                                                            for m in models])
        out += [table(["score", "reconstruct", "calibration"] + short, rows), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
