"""One-shot quality of head and neuron pruning on the builtin models, side by side in one run.

For each builtin model (tiny-llama, tiny-qwen2, tiny-phi3): held-out builtin:pydoc perplexity
after removing half the KV groups (G50), 1 and 2 of 4 query heads per group (Q25, Q50), and
25% / 50% of MLP channels (N25, N50), with every score, with and without least-squares
reconstruction, independent vs sequential calibration, and Torch-Pruning 1.6.1 where it can
reach the budget (it removes query heads, never KV heads). Uniform and global allocation for
every importance score; for half the KV groups, the best of all 2^layers uniform group choices
(picked by held-out perplexity: an upper bound no score can beat, not a method). Layer drop by
block influence (ShortGPT) and angular distance (Gromov et al.), with and without least-squares
repair, against dropping the last layers. Same calibration windows (64 x 128 tokens of the train
split, seed 0) and same evaluation tokens for every row. No recovery.

    python -m benchmarks.quality            # all three models, one after another
    python -m benchmarks.quality --models builtin:tiny-llama   # one model; results/quality_<model>.json
    python -m benchmarks.quality --render   # rebuild results/quality.md from the per-model JSON files
    python -m benchmarks.quality --resume   # measure only rows missing from the JSON files (new scores)

Each model's results go to their own JSON file, so models can run in parallel processes; the
table is rendered from every per-model file present.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from benchmarks.common import context, table, write_result
from gqaprune.builtin.tiny import BUILTIN_MODELS, resolve_builtin
from gqaprune.io.checkpoint import load_pretrained
from gqaprune.io.data import calibration_windows, token_stream
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.recipe import HeadPruneStage, NeuronPruneStage
from gqaprune.io.sources import load_tokenizer
from gqaprune.arch.adapter import decoder_layers, resolve_adapter
from gqaprune.recipe import LayerDropStage
from gqaprune.stages.head_prune import HeadPrune
from gqaprune.stages.layer_drop import LayerDrop
from gqaprune.stages.neuron_prune import NeuronPrune
from gqaprune.ops.surgery import drop_layers, prune_heads

RESULTS = Path(__file__).parent / "results"

HEAD_BUDGETS = {
    "G50": {"unit": "group", "prune_ratio": 0.5},
    "Q25": {"unit": "query_head", "prune_ratio": 0.25},
    "Q50": {"unit": "query_head", "prune_ratio": 0.5},
}
HEAD_SCORES = ["taylor", "magnitude", "activation", "reconstruction", "ablation", "random", "truncate"]
NEURON_BUDGETS = {"N25": 0.25, "N50": 0.5, "N75": 0.75}
NEURON_SCORES = ["taylor", "magnitude", "activation", "frequency", "reconstruction", "random"]
GLOBAL_SCORES = ["taylor", "magnitude", "activation", "reconstruction", "ablation"]
LAYER_BUDGETS = {"L1": 1, "L2": 2}  # layers dropped of 4 (L2 may drop the last layer)


class Bench:
    def __init__(self, name: str, folder=None):
        self.name = name
        self.folder = folder or resolve_builtin(name)
        self.tok = load_tokenizer(self.folder)
        self.calib = calibration_windows(self.tok, "builtin:pydoc", "train", 64, 128, seed=0)
        self.eval_tokens = token_stream(self.tok, "builtin:pydoc", "validation")
        self.adapter = resolve_adapter("auto", self.fresh().config.architectures)

    def fresh(self):
        return load_pretrained(self.folder).eval()

    def ppl(self, model) -> float:
        return perplexity(model, self.eval_tokens, 128, None, 16, progress=False)["perplexity"]

    def heads(self, budget: dict, score: str, reconstruct: str, allocation="uniform", sequential=False,
              seed=0) -> float:
        model = self.fresh()
        stage = {"type": "head_prune", "score": score, "reconstruct": reconstruct, "allocation": allocation, **budget}
        HeadPrune(HeadPruneStage(**stage)).apply(context(model, self.calib, stage, sequential=sequential, seed=seed))
        return self.ppl(model)

    def neurons(self, ratio: float, score: str, reconstruct: str, sequential=False, allocation="uniform") -> float:
        model = self.fresh()
        stage = {"type": "neuron_prune", "prune_ratio": ratio, "score": score, "reconstruct": reconstruct,
                 "align": 64, "allocation": allocation}
        NeuronPrune(NeuronPruneStage(**stage)).apply(context(model, self.calib, stage, sequential=sequential))
        return self.ppl(model)

    def layers(self, n: int, score: str, reconstruct: str) -> tuple[float, list[int]]:
        model = self.fresh()
        stage = {"type": "layer_drop", "num_layers": n, "score": score, "reconstruct": reconstruct,
                 "protect_first": 1, "protect_last": 1 if n == 1 else 0}
        rep = LayerDrop(LayerDropStage(**stage)).apply(context(model, self.calib, stage))
        return self.ppl(model), rep["dropped_layers"]

    def drop_last(self, n: int) -> float:
        model = self.fresh()
        total = len(decoder_layers(model, self.adapter))
        drop_layers(model, self.adapter, list(range(total - n, total)))
        return self.ppl(model)

    def best_group_choice(self) -> tuple[float, list[int]]:
        """Keep one KV group (with its query heads) per layer, every combination; the lowest held-out perplexity."""
        probe = self.fresh()
        n_layers = len(decoder_layers(probe, self.adapter))
        nq, nkv = probe.config.num_attention_heads, probe.config.num_key_value_heads
        g = nq // nkv
        best = (float("inf"), [])
        for choice in itertools.product(range(nkv), repeat=n_layers):
            model = self.fresh()
            for i, j in enumerate(choice):
                prune_heads(model, self.adapter, i, {j: [j * g + h for h in range(g)]})
            best = min(best, (self.ppl(model), list(choice)))
        return best

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


def run_model(name: str, previous: dict | None = None) -> dict:
    """Every row for one model; with ``previous`` (--resume), rows already measured are kept, not re-run."""
    b = Bench(name)
    prev = previous or {}
    r = {"dense": prev.get("dense") or b.ppl(b.fresh()), "heads": {}, "neurons": {}, "tp": {}, "layers": {},
         "oracle": {}}

    def put(section: str, key: str, measure):
        done = prev.get(section, {})
        r[section][key] = done[key] if key in done else measure()

    print(name, "dense", r["dense"], flush=True)
    for bud, spec in HEAD_BUDGETS.items():
        for score in HEAD_SCORES:
            for rec in ("none", "least_squares"):
                put("heads", f"{bud}|{score}|{rec}|uniform|indep", lambda: b.heads(spec, score, rec))
        # with 2 KV groups and min_groups_per_layer 1, global group allocation has no choice: taylor only
        for score in GLOBAL_SCORES if spec["unit"] == "query_head" else ["taylor"]:
            for rec in ("none", "least_squares"):
                put("heads", f"{bud}|{score}|{rec}|global|indep", lambda: b.heads(spec, score, rec, "global"))
        for rec in ("none", "least_squares"):
            put("heads", f"{bud}|taylor|{rec}|by_layer_importance|indep",
                lambda: b.heads(spec, "taylor", rec, "by_layer_importance"))
        put("heads", f"{bud}|taylor|least_squares|uniform|seq",
            lambda: b.heads(spec, "taylor", "least_squares", sequential=True))
        print(name, bud, {k: round(v, 2) for k, v in r["heads"].items() if k.startswith(bud)}, flush=True)

    def best():
        ppl, choice = b.best_group_choice()
        return {"perplexity": ppl, "kept_group_per_layer": choice}
    put("oracle", "G50", best)
    for bud, ratio in NEURON_BUDGETS.items():
        for score in NEURON_SCORES:
            for rec in ("none", "least_squares"):
                put("neurons", f"{bud}|{score}|{rec}|uniform|indep", lambda: b.neurons(ratio, score, rec))
        for score in ("taylor", "activation"):
            for rec in ("none", "least_squares"):
                put("neurons", f"{bud}|{score}|{rec}|global|indep",
                    lambda: b.neurons(ratio, score, rec, allocation="global"))
        put("neurons", f"{bud}|taylor|least_squares|uniform|seq",
            lambda: b.neurons(ratio, "taylor", "least_squares", sequential=True))
        print(name, bud, {k: round(v, 2) for k, v in r["neurons"].items() if k.startswith(bud)}, flush=True)
    for bud, n in LAYER_BUDGETS.items():
        for score in ("block_influence", "angular_block"):
            for rec in ("none", "least_squares"):
                def drop():
                    ppl, dropped = b.layers(n, score, rec)
                    return {"perplexity": ppl, "dropped": dropped}
                put("layers", f"{bud}|{score}|{rec}", drop)
        put("layers", f"{bud}|last layers|none", lambda: {"perplexity": b.drop_last(n), "dropped": f"last {n}"})
    for imp in ("magnitude", "taylor"):
        for bud, ratio in (("Q25", 0.25), ("Q50", 0.5)):
            put("tp", f"{bud}|{imp}", lambda: b.torch_pruning("heads", ratio, imp))
        for bud, ratio in NEURON_BUDGETS.items():
            put("tp", f"{bud}|{imp}", lambda: b.torch_pruning("mlp", ratio, imp))
    return r


def _json_path(name: str) -> Path:
    return RESULTS / f"quality_{name.removeprefix('builtin:')}.json"


def render_all() -> None:
    results = {m: json.loads(_json_path(m).read_text()) for m in BUILTIN_MODELS if _json_path(m).exists()}
    write_result("quality", render(results))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(BUILTIN_MODELS))
    ap.add_argument("--render", action="store_true", help="only rebuild the table from the JSON files")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the JSON files; measure the rest")
    args = ap.parse_args()
    if not args.render:
        torch.set_num_threads(1)  # tiny models: one thread is faster and immune to other load on the machine
        for name in args.models:
            t0 = time.perf_counter()
            previous = json.loads(_json_path(name).read_text()) if args.resume and _json_path(name).exists() else None
            r = run_model(name, previous)
            r["seconds"] = time.perf_counter() - t0 + (previous or {}).get("seconds", 0)
            _json_path(name).write_text(json.dumps(r, indent=2, sort_keys=True))
    render_all()


_ALLOCATIONS = ["uniform", "global", "by_layer_importance"]
_LAYER_SCORES = ["block_influence", "angular_block", "last layers"]


def _row_order(key: str, scores: list[str]) -> tuple:
    """Rows grouped by score (in the benchmark's order), then none before least_squares, then allocation
    and calibration mode; the JSON files keep keys sorted alphabetically, this restores a reading order."""
    parts = key.split("|")[1:]
    score, rec = parts[0], parts[1]
    rest = parts[2:]
    return (scores.index(score) if score in scores else len(scores), rec != "none",
            _ALLOCATIONS.index(rest[0]) if rest else 0, rest[1:] if rest else [])


def _ppl(v):
    return v if isinstance(v, str) else round(v, 2)


def _score_rows(results: dict, models: list[str], kind: str, bud: str, scores: list[str]) -> list[list]:
    """One table row per (score, reconstruct, allocation, calibration) run of budget ``bud`` in
    ``results[model][kind]`` ("heads" or "neurons"), a perplexity column per model."""
    rows = []
    keys = [k for k in results[models[0]][kind] if k.startswith(bud + "|")]
    for k in sorted(keys, key=lambda k: _row_order(k, scores)):
        _, score, rec, alloc, mode = k.split("|")
        rows.append([score, rec, alloc, "sequential" if mode == "seq" else "independent"]
                    + [_ppl(results[m][kind].get(k, "n/a")) for m in models])
    return rows


def render(results: dict) -> str:
    models = list(results)
    short = [m.removeprefix("builtin:") for m in models]
    minutes = ", ".join(f"{s} {results[m].get('seconds', 0) / 60:.1f}" for s, m in zip(short, models))
    out = ["## One-shot quality: held-out builtin:pydoc perplexity (lower is better)", "",
           "`python -m benchmarks.quality` — no recovery; calibration 64 x 128 tokens (train split, seed 0); "
           f"evaluation on the whole validation split; minutes per model on this machine: {minutes}.", "",
           "Dense: " + ", ".join(f"{s} {results[m]['dense']:.2f}" for s, m in zip(short, models)), ""]

    for bud, spec in HEAD_BUDGETS.items():
        out += [f"### Heads {bud}: {spec['unit']}, prune_ratio {spec['prune_ratio']}", ""]
        rows = _score_rows(results, models, "heads", bud, HEAD_SCORES)
        tp_rows = {"Q25": "Q25", "Q50": "Q50", "G50": "Q50"}
        for imp in ("magnitude", "taylor"):
            tk = f"{tp_rows[bud]}|{imp}"
            label = f"Torch-Pruning {imp}" + ("" if bud != "G50" else " at Q50 (its maximum: it never removes KV "
                                                                      "heads; fewer parameters removed than G50)")
            rows.append([label, "-", "uniform", "-"] + [_ppl(results[m]["tp"].get(tk, "n/a")) for m in models])
        if bud == "G50":
            rows.append(["best of all uniform group choices (upper bound, picked on the evaluation text)", "none",
                         "uniform", "-"] + [f"{_ppl(results[m]['oracle']['G50']['perplexity'])} (kept "
                                            f"{results[m]['oracle']['G50']['kept_group_per_layer']})" for m in models])
        out += [table(["score", "reconstruct", "allocation", "calibration"] + short, rows), ""]
    for bud, ratio in NEURON_BUDGETS.items():
        out += [f"### MLP channels {bud}: prune_ratio {ratio}, align 64", ""]
        rows = _score_rows(results, models, "neurons", bud, NEURON_SCORES)
        for imp in ("magnitude", "taylor"):
            rows.append([f"Torch-Pruning {imp}", "-", "uniform", "-"]
                        + [_ppl(results[m]["tp"].get(f"{bud}|{imp}", "n/a")) for m in models])
        out += [table(["score", "reconstruct", "allocation", "calibration"] + short, rows), ""]
    for bud, n in LAYER_BUDGETS.items():
        out += [f"### Layer drop {bud}: {n} of 4 layers (protect_first 1, protect_last {1 if n == 1 else 0})", ""]
        rows = []
        keys = [k for k in results[models[0]].get("layers", {}) if k.startswith(bud + "|")]
        for k in sorted(keys, key=lambda k: _row_order(k, _LAYER_SCORES)):
            _, score, rec = k.split("|")
            rows.append([score, rec] + [f"{_ppl(results[m]['layers'][k]['perplexity'])} (dropped "
                                        f"{results[m]['layers'][k]['dropped']})" for m in models])
        out += [table(["score", "reconstruct"] + short, rows), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
