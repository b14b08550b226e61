"""One-shot pruning of a real pretrained model (SmolLM2-135M-Instruct) against every peer, side by side.

    python -m benchmarks.real                 # every row, in priority order; results/real.json + real.md
    python -m benchmarks.real --minutes 60    # stop starting new rows after 60 minutes (rows already in
                                              # real.json are kept: the run resumes where it stopped)
    python -m benchmarks.real --render        # only rebuild results/real.md from results/real.json

Held-out perplexity: calibration on builtin:pydoc's train split (8 windows x 256 tokens, seed 0: more tokens
than down_proj has inputs, so least squares does not lean on its damping), evaluation on the first 4,096 scored
tokens of its validation split (no unit of it is in train) in windows of 256 tokens.
Budgets are fractions of ALL parameters (134.5M, tied embeddings counted once) removed; each row reports what it
actually removed. Rows run in priority order (the 25% headline first, then 15%, 5%, then the score matrix), so
a run stopped by --minutes still has the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch

from benchmarks.common import context, resumable, table, write_result
from benchmarks.peers import flap, layer_baselines, wanda_sp
from benchmarks.peers.input_stats import params
from gqaprune.arch.adapter import resolve_adapter
from gqaprune.builtin.smollm2 import resolve_smollm2
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.io.checkpoint import load_pretrained
from gqaprune.io.data import calibration_windows, token_stream
from gqaprune.io.sources import load_tokenizer
from gqaprune.ops.surgery import drop_layers
from gqaprune.stages import STAGES

RESULTS = Path(__file__).parent / "results"
JSON = RESULTS / "real.json"  # --part N writes real_partN.json: parallel processes, merged by --render
CALIB_SAMPLES, CALIB_LEN = 8, 256
EVAL_TOKENS, EVAL_WINDOW, LONG_WINDOW = 4096, 256, 2048


class Bench:
    def __init__(self):
        self.folder = resolve_smollm2()  # builtin:smollm2-135m (converted from the GGUF once, cached)
        self.tok = load_tokenizer(self.folder)
        self.calib = calibration_windows(self.tok, "builtin:pydoc", "train", CALIB_SAMPLES, CALIB_LEN, seed=0)
        self.eval_tokens = token_stream(self.tok, "builtin:pydoc", "validation")
        self.adapter = resolve_adapter("auto", self.fresh().config.architectures)
        self.dense_params = params(self.fresh())

    def fresh(self):
        return load_pretrained(self.folder).eval()

    def ppl(self, model, window=EVAL_WINDOW, tokens=EVAL_TOKENS) -> float:
        return perplexity(model, self.eval_tokens[: tokens + 1], window, None, 8, progress=False)["perplexity"]

    def gq(self, model, stages: list[dict]):
        """gqaprune stages applied in order, each with its own calibration pass on the current model."""
        for st in stages:
            cls = STAGES[st["type"]]
            cls(cls.Config(**st)).apply(context(model, self.calib, st))
        return model


def run_rows(name: str, path: Path, jobs_of, render, only_help: str) -> None:
    """The command line of a benchmark whose rows are (key, budget, build(model) -> (model, extra dict)) built by
    ``jobs_of(bench)``: --only REGEX runs only the matching rows, --render only rewrites results/<name>.md. Rows
    already in ``path`` are kept and skipped; each row stores perplexity, the share of parameters removed, its
    budget, seconds and ``extra``, and the file is rewritten whole after every row."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help=only_help)
    ap.add_argument("--render", action="store_true", help=f"only rewrite results/{name}.md from the JSON")
    args = ap.parse_args()
    if args.render:
        write_result(name, render(json.loads(path.read_text())))
        return
    torch.set_num_threads(2)
    b = Bench()
    res, save = resumable(path)
    res.setdefault("dense", b.ppl(b.fresh()))
    res["dense_params"] = b.dense_params
    t_start = time.perf_counter()
    for key, bud, build in jobs_of(b):
        if key in res["rows"] or (args.only and not re.search(args.only, key)):
            continue
        t0 = time.perf_counter()
        m, extra = build(b.fresh())
        res["rows"][key] = {"ppl": b.ppl(m), "removed": 1 - params(m) / b.dense_params, "budget": bud,
                            "seconds": round(time.perf_counter() - t0, 1), **extra}
        save()
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {key}: {res['rows'][key]}", flush=True)
    res["seconds"] = round(res.get("seconds", 0.0) + time.perf_counter() - t_start, 1)
    save()
    write_result(name, render(res))


# ---------------------------------------------------------------------------------------------------------
# the rows: (key, budget label, axis, method label, builder(bench, model) -> model)


def heads(unit_keep: dict, score="taylor", rec="least_squares", alloc="uniform") -> dict:
    unit = "group" if "keep_kv_heads" in unit_keep else "query_head"
    return {"type": "head_prune", "unit": unit, **unit_keep, "score": score, "reconstruct": rec, "allocation": alloc}


def mlp(keep: int, score="taylor", rec="least_squares", alloc="uniform") -> dict:
    return {"type": "neuron_prune", "keep": keep, "score": score, "reconstruct": rec, "allocation": alloc,
            "align": 64}


def drop(n: int, score: str, rec: str) -> dict:
    return {"type": "layer_drop", "num_layers": n, "score": score, "reconstruct": rec}


def gq_row(stages):
    return lambda b, m: b.gq(m, stages)


def tp_row(kind: str, ratio: float, imp: str):
    def run(b, m):
        from benchmarks.peers import torch_pruning_baseline as tpb
        fn = {"heads": tpb.tp_prune_attention, "mlp": tpb.tp_prune_mlp, "default": tpb.tp_prune_default}[kind]
        fn(m, b.calib, ratio, imp)
        return m
    return run


def flap_row(frac: float):
    def run(b, m):
        flap.flap_prune(m, b.adapter, b.calib, int(frac * b.dense_params))
        return m
    return run


def wanda_row(groups: int, channels: int):
    def run(b, m):
        wanda_sp.wanda_sp_prune(m, b.adapter, b.calib, groups, channels)
        return m
    return run


def layers_row(n: int, how: str):
    def run(b, m):
        pick = layer_baselines.shortgpt_layers if how == "shortgpt" else layer_baselines.angular_block
        drop_layers(m, b.adapter, pick(m, b.calib, n))
        return m
    return run


# per budget: query heads kept per group / KV groups kept / MLP width kept / layers dropped, chosen so the
# parameters removed come closest to the budget on this model (9 Q / 3 KV heads, MLP 1536, 30 layers)
BUDGETS = {
    "25%": {"mlp": 896, "layers": 9, "combined": [({"keep_q_per_kv": 2}, 1024), ({"keep_kv_heads": 2}, 1088)],
            "tp_default": 0.135, "wanda": (1, 478)},
    "15%": {"mlp": 1152, "layers": 6, "combined": [({"keep_q_per_kv": 2}, 1280)], "heads": {"keep_q_per_kv": 1},
            "groups": {"keep_kv_heads": 1}, "tp_default": 0.065, "wanda": (1, 218)},
    "5%": {"mlp": 1408, "layers": 2, "heads": {"keep_q_per_kv": 2}, "groups": {"keep_kv_heads": 2},
           "wanda": (0, 130)},
}
FLAP_FRACTION = {"25%": 0.246, "15%": 0.148, "5%": 0.049}
HEAD_SCORES = ["taylor", "magnitude", "activation", "reconstruction", "random", "truncate"]
MLP_SCORES = ["taylor", "magnitude", "activation", "reconstruction", "random"]


def headline_rows(bud: str) -> list:
    """The rows of one budget, most telling first (a run cut short by --minutes keeps the head of the list)."""
    spec = BUDGETS[bud]
    combined = []
    for hk, keep in spec.get("combined", []):
        for alloc in ("uniform", "global"):
            name = "groups" if "keep_kv_heads" in hk else "query heads"
            combined.append((f"{bud}|combined|gqaprune taylor+LS {alloc} ({name} {hk} + MLP {keep})", bud,
                             "combined", gq_row([heads(hk, alloc=alloc), mlp(keep, alloc=alloc)])))
    n = spec["layers"]
    g, c = spec["wanda"]
    if bud == "25%":
        for alloc in ("uniform", "global"):
            combined.append((f"{bud}|combined|gqaprune activation+LS {alloc} (query heads {{'keep_q_per_kv': 2}} + MLP "
                             "1024)", bud, "combined", gq_row([heads({"keep_q_per_kv": 2}, "activation", alloc=alloc),
                                                              mlp(1024, "activation", alloc=alloc)])))
    if bud == "25%":  # the quick start recipe (recipes/quickstart.yaml), and the same with global allocation
        for alloc in ("uniform", "global"):
            combined.append((f"{bud}|combined|gqaprune quickstart recipe, {alloc} (drop 3 layers + query heads "
                             "{'keep_q_per_kv': 2} + MLP 1152, taylor+LS)", bud, "combined",
                             gq_row([dict(drop(3, "block_influence", "least_squares"), protect_first=1,
                                          protect_last=1),
                                     heads({"keep_q_per_kv": 2}, alloc=alloc), mlp(1152, alloc=alloc)])))
    rows = combined[:1]
    rows.append((f"{bud}|combined|FLAP", bud, "combined", flap_row(FLAP_FRACTION[bud])))
    if "tp_default" in spec:
        rows.append((f"{bud}|combined|Torch-Pruning default (hidden+heads+MLP, ratio {spec['tp_default']}) magnitude",
                     bud, "combined", tp_row("default", spec["tp_default"], "magnitude")))
    rows.append((f"{bud}|layers|ShortGPT (plain re-implementation)", bud, "layers", layers_row(n, "shortgpt")))
    rows.append((f"{bud}|layers|angular block, last token (plain re-implementation)", bud, "layers",
                 layers_row(n, "angular")))
    rows.append((f"{bud}|combined|Wanda-sp ({g} group + {c} channels per layer)", bud, "combined", wanda_row(g, c)))
    rows += combined[1:]
    for score in ("block_influence", "angular_block"):
        for rec in ("least_squares", "none"):
            rows.append((f"{bud}|layers|gqaprune layer_drop {score} {rec}", bud, "layers",
                         gq_row([drop(n, score, rec)])))
    for alloc in ("uniform", "global"):
        rows.append((f"{bud}|mlp|gqaprune taylor+LS {alloc}", bud, "mlp", gq_row([mlp(spec["mlp"], alloc=alloc)])))
    removed = (1536 - spec["mlp"]) / 1536
    for imp in ("magnitude", "taylor"):
        rows.append((f"{bud}|mlp|Torch-Pruning {imp}", bud, "mlp", tp_row("mlp", removed, imp)))
    for axis in ("heads", "groups"):
        if axis in spec:
            for alloc in ("uniform", "global"):
                rows.append((f"{bud}|{axis}|gqaprune taylor+LS {alloc}", bud, axis,
                             gq_row([heads(spec[axis], alloc=alloc)])))
    if bud == "5%":
        for imp in ("magnitude", "taylor"):
            rows.append((f"{bud}|heads|Torch-Pruning {imp}", bud, "heads", tp_row("heads", 0.25, imp)))
    return rows


def matrix_rows() -> list:
    """Every score x allocation x repair on query heads (5%), KV groups (5%) and MLP channels (15%)."""
    rows = []
    for score in HEAD_SCORES:
        for alloc in ("uniform", "global") if score not in ("random", "truncate") else ("uniform",):
            for rec in ("least_squares", "none"):
                rows.append((f"5%|heads|gqaprune {score} {rec} {alloc}", "5%", "heads",
                             gq_row([heads({"keep_q_per_kv": 2}, score, rec, alloc)])))
    for score in HEAD_SCORES:
        for alloc in ("uniform", "global") if score not in ("random", "truncate") else ("uniform",):
            for rec in ("least_squares", "none"):
                rows.append((f"5%|groups|gqaprune {score} {rec} {alloc}", "5%", "groups",
                             gq_row([heads({"keep_kv_heads": 2}, score, rec, alloc)])))
    for score in MLP_SCORES:
        for alloc in ("uniform", "global") if score in ("taylor", "activation") else ("uniform",):
            for rec in ("least_squares", "none"):
                rows.append((f"15%|mlp|gqaprune {score} {rec} {alloc}", "15%", "mlp",
                             gq_row([mlp(1152, score, rec, alloc)])))
    return rows


def all_rows() -> list:
    rows = headline_rows("25%") + headline_rows("15%") + headline_rows("5%") + matrix_rows()
    seen, out = set(), []
    for r in rows:  # the matrix repeats headline rows under other names; keys are unique
        if r[0] not in seen:
            seen.add(r[0])
            out.append(r)
    return out


def run(minutes: float, only: str | None, path: Path = JSON) -> dict:
    torch.set_num_threads(2)
    res = json.loads(path.read_text()) if path.exists() else {"rows": {}, "seconds": 0.0}
    b = Bench()
    t_start = time.perf_counter()

    def save():
        res["seconds"] = res.get("seconds_before", res["seconds"]) + time.perf_counter() - t_start
        RESULTS.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)  # nothing half-written

    res["seconds_before"] = res.get("seconds", 0.0)
    res.update(model=str(b.folder), dense_params=b.dense_params, eval_tokens=EVAL_TOKENS, eval_window=EVAL_WINDOW,
               calibration=f"{CALIB_SAMPLES} x {CALIB_LEN} tokens, builtin:pydoc train, seed 0")
    if "dense" not in res:
        res["dense"] = b.ppl(b.fresh())
        save()
    print(f"dense perplexity {res['dense']:.3f} ({b.dense_params} parameters)", flush=True)
    for key, bud, axis, build in all_rows():
        if key in res["rows"] or (only and not re.search(only, key)):
            continue
        if (time.perf_counter() - t_start) / 60 > minutes:
            print(f"--minutes {minutes} reached; stopping before {key}", flush=True)
            break
        t0 = time.perf_counter()
        try:
            m = build(b, b.fresh())
            row = {"ppl": b.ppl(m), "removed": 1 - params(m) / b.dense_params}
        except Exception as e:  # a peer that cannot do it: recorded, not fatal
            row = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        row.update(budget=bud, axis=axis, seconds=round(time.perf_counter() - t0, 1), load=round(os.getloadavg()[0], 1))
        res["rows"][key] = row
        save()
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {key}: {row}", flush=True)
    return res


def long_context(res: dict, path: Path = JSON) -> None:
    """Perplexity at 2,048-token windows: the dense model and the best gqaprune recipe at 25%."""
    b = Bench()
    best = best_key(merged(), "25%")  # over every process's rows
    if best is None or "long" in res and res["long"].get("best_key") == best:
        return
    tokens = 2 * LONG_WINDOW  # two full windows of the validation split (time on 2 shared cores)
    dense = b.ppl(b.fresh(), LONG_WINDOW, tokens)
    build = dict((k, f) for k, _, _, f in all_rows())[best]
    pruned = b.ppl(build(b, b.fresh()), LONG_WINDOW, tokens)
    res["long"] = {"best_key": best, "tokens": tokens, "dense": dense, "pruned": pruned}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


def best_key(res: dict, bud: str) -> str | None:
    cands = [(r["ppl"], k) for k, r in res["rows"].items()
             if r.get("budget") == bud and "gqaprune" in k and "ppl" in r]
    return min(cands)[1] if cands else None


def load_range(res: dict) -> str:
    loads = [r["load"] for r in res["rows"].values() if "load" in r]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def render(res: dict) -> str:
    dense = res["dense"]
    out = ["## Real model: SmolLM2-135M (one-shot, held-out perplexity; lower is better)", "",
           f"`python -m benchmarks.real` — {res['seconds'] / 60:.0f} process-minutes on this machine (2 cores; "
           f"1-minute load average {load_range(res)} while the rows ran, so row seconds are not timings); "
           f"model {res['dense_params']:,} parameters; calibration {res['calibration']}; evaluation on the first "
           f"{res['eval_tokens']} tokens of builtin:pydoc's validation split (never calibrated on) in "
           f"{res['eval_window']}-token windows. Dense perplexity **{dense:.2f}**. `removed` is the share of all "
           "parameters removed (tied embeddings once); `x dense` is perplexity over the dense model's. "
           "No recovery training. Best gqaprune recipe per budget in bold (picked on the evaluation text).", ""]
    for bud in ("25%", "15%", "5%"):
        best = best_key(res, bud)
        rows = []
        for k, r in res["rows"].items():
            if r.get("budget") != bud:
                continue
            label = k.split("|", 2)[2]
            if k == best:
                label = f"**{label}**"
            if "ppl" in r:
                rows.append([r["axis"], label, f"{100 * r['removed']:.1f}%", round(r["ppl"], 2),
                             f"x{r['ppl'] / dense:.2f}"])
            else:
                rows.append([r["axis"], label, "-", "fails", r["error"][:90]])
        rows.sort(key=lambda r: (r[0], r[3] if isinstance(r[3], float) else 1e9))
        missing = [k.split("|", 2)[2] + f" ({k.split('|')[1]})" for k, b, _, _ in all_rows()
                   if b == bud and k not in res["rows"]]
        out += [f"### About {bud} of the parameters removed", ""]
        out += [table(["axis", "method", "removed", "perplexity", "x dense"], rows), ""] if rows else []
        if missing:
            out += [f"Not measured in this run (compute budget; `--only` runs them): {'; '.join(missing)}.", ""]
    if "long" in res:
        lg = res["long"]
        out += [f"### 2,048-token windows ({lg['tokens']} validation tokens)", "",
                table(["model", "perplexity", "x dense"],
                      [["dense", round(lg["dense"], 2), "x1.00"],
                       [lg["best_key"].split("|", 2)[2], round(lg["pruned"], 2), f"x{lg['pruned'] / lg['dense']:.2f}"]]),
                ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=1e9, help="start no new row after this many minutes")
    ap.add_argument("--only", help="run only rows whose key matches this regular expression")
    ap.add_argument("--long", action="store_true", help="also the 2,048-token windows (dense and best 25%%)")
    ap.add_argument("--part", type=int, help="write results/real_partN.json (a second process on other rows)")
    ap.add_argument("--long-only", action="store_true", help="only the 2,048-token windows (into real.json)")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.long_only:  # its own file, so that it can run beside the other processes
        long_context({"rows": {}, "seconds": 0.0}, JSON.with_name("real_part_long.json"))
    elif not args.render:
        path = JSON.with_name(f"real_part{args.part}.json") if args.part else JSON
        res = run(args.minutes, args.only, path)
        if args.long:
            long_context(res)
    write_result("real", render(merged()))


def merged() -> dict:
    """real.json with the rows of every real_partN.json added (their minutes added too)."""
    res = json.loads(JSON.read_text())
    for part in sorted(RESULTS.glob("real_part*.json")):
        extra = json.loads(part.read_text())
        res["rows"].update(extra["rows"])
        if "long" in extra:
            res["long"] = extra["long"]
        res["seconds"] += extra.get("seconds", 0.0)
    return res


if __name__ == "__main__":
    main()
