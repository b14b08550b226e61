"""hidden_prune on one model: held-out perplexity at 10/20/30% of the hidden size removed.

Rows per budget: every score with and without least-squares repair (rotate none), activation with
rotate: pca (repair on and off), and Torch-Pruning's hidden-size pruning (magnitude, taylor) at the same
kept width, and SliceGPT (benchmarks/peers/slicegpt.py: one PCA rotation per residual position with shortcut
matrices between them, not a stock architecture) at the same kept width and at the parameter count of gqaprune's
rotate-pca row. Same calibration windows and evaluation tokens for every row; no recovery. Kept widths are
multiples of 8 (align 8). Rows are written to results/hidden_<model>.json as they finish (a rerun skips
rows already there; --remeasure re-runs stored rows and shows the old result beside the new) and rendered to
results/hidden.md.

    python -m benchmarks.hidden --model builtin:tiny-llama
    python -m benchmarks.hidden --model path/to/hf-folder --name smollm2-135m --samples 16 --eval-tokens 8192
    python -m benchmarks.hidden --render
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import context, table, write_result
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.io.checkpoint import load_pretrained
from gqaprune.io.data import calibration_windows, token_stream
from gqaprune.io.sources import load_tokenizer, resolve_model
from gqaprune.recipe import HiddenPruneStage
from gqaprune.stages.hidden_prune import HiddenPrune

RESULTS = Path(__file__).parent / "results"
RATIOS = (0.1, 0.2, 0.3)
SCORES = ("activation", "magnitude", "taylor", "random")


def rows_for(ratio: float, quick: bool, holdout: float | None = None) -> list[dict]:
    """The rows of one budget; ``holdout`` (reconstruct_holdout, when not the default) joins the repaired rows' key."""
    extra = {"holdout": holdout} if holdout is not None else {}
    rows = [{"ratio": ratio, "method": "gqaprune", "score": s, "rotate": "none", "reconstruct": r,
             **(extra if r == "least_squares" else {})}
            for s in (SCORES[:1] if quick else SCORES) for r in ("none", "least_squares")]
    rows += [{"ratio": ratio, "method": "gqaprune", "score": "activation", "rotate": "pca", "reconstruct": r,
              **(extra if r == "least_squares" else {})}
             for r in ("none", "least_squares")]
    rows += [{"ratio": ratio, "method": "torch_pruning", "score": s} for s in ("magnitude", "taylor")]
    rows += [{"ratio": ratio, "method": "slicegpt", "score": "pca"},
             {"ratio": ratio, "method": "slicegpt", "score": "pca", "budget": "params"}]
    return rows


def stock_param_count(config, kept: int) -> int:
    """Parameters of the stock Llama-family model at residual width ``kept`` with an untied head: what gqaprune's
    rotate-pca rows leave (hidden_prune unties a tied head when it rotates)."""
    v, n, inter = config.vocab_size, config.num_hidden_layers, config.intermediate_size
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return 2 * v * kept + n * (kept * (q + 2 * kv) + q * kept + 3 * inter * kept + 2 * kept) + kept


def key(row: dict) -> str:
    return "|".join(f"{k}={row[k]}" for k in sorted(row) if k in ("ratio", "method", "score", "rotate", "reconstruct", "holdout", "budget"))


def measure(row: dict, folder, calib, eval_tokens, align: int) -> dict:
    model = load_pretrained(folder).eval()
    params_before = sum(p.numel() for p in model.parameters())
    width = model.config.hidden_size
    t = time.perf_counter()
    if row["method"] == "gqaprune":
        stage = {"type": "hidden_prune", "prune_ratio": row["ratio"], "align": align, "score": row["score"],
                 "rotate": row["rotate"], "reconstruct": row["reconstruct"],
                 **({"reconstruct_holdout": row["holdout"]} if "holdout" in row else {})}
        rep = HiddenPrune(HiddenPruneStage(**stage)).apply(context(model, calib, stage))
        extra = {"mean_rel_error_slice": rep.get("repair", {}).get("mean_rel_error_slice"),
                 "mean_rel_error_lsq": rep.get("repair", {}).get("mean_rel_error_lsq"),
                 "untied_lm_head": rep.get("untied_lm_head", False),
                 "repair_choices": rep.get("repair", {}).get("repair_choices")}
    elif row["method"] == "slicegpt":
        from benchmarks.peers.slicegpt import slicegpt_param_count, slicegpt_prune

        kept = int(round(width * (1 - row["ratio"]))) // align * align  # the same kept width as gqaprune's
        if row.get("budget") == "params":  # the widest aligned width within gqaprune's rotate-pca row's parameters
            target = stock_param_count(model.config, kept)
            kept = max(k for k in range(align, width + 1, align) if slicegpt_param_count(model.config, k) <= target)
        rep = slicegpt_prune(model, calib, kept)
        extra = {"note": rep["note"] + (f"; width chosen for at most {target:,} parameters (gqaprune rotate-pca at "
                                        f"this ratio)" if row.get("budget") == "params" else ""),
                 "hidden_size": kept, "untied_lm_head": rep["untied_lm_head"],
                 "shortcut_params": rep["shortcut_params"]}
    else:
        from benchmarks.peers.torch_pruning_baseline import tp_prune_hidden

        kept = int(round(width * (1 - row["ratio"]))) // align * align  # the same kept width as gqaprune's
        rep = tp_prune_hidden(model, calib, 1 - kept / width, row["score"], round_to=align)
        extra = {"note": rep["note"]}
    seconds = time.perf_counter() - t
    ppl = perplexity(model, eval_tokens, 128, None, 8, progress=False)["perplexity"]
    hidden = extra.pop("hidden_size", model.config.hidden_size)
    return {**row, **extra, "hidden_size": hidden, "hidden_size_before": width,
            "params": sum(p.numel() for p in model.parameters()), "params_before": params_before,
            "ppl": ppl, "seconds": round(seconds, 1)}


def render() -> str:
    parts = ["# hidden_prune: held-out perplexity after removing hidden-size channels\n",
             "builtin:pydoc validation tokens, 128-token windows; no recovery. `python -m benchmarks.hidden`.\n"]
    for path in sorted(RESULTS.glob("hidden_*.json")):
        data = json.loads(path.read_text())
        parts.append(f"\n## {data['model']} (dense perplexity {data['dense_ppl']:.2f}, hidden {data['hidden_size']}, "
                     f"{data['params']:,} parameters; calibration {data['samples']} x 128 tokens, "
                     f"{data['eval_tokens']} evaluation tokens)\n")
        rows = []
        for r in sorted(data["rows"].values(), key=lambda r: (r["ratio"], r["method"], r.get("rotate", ""),
                                                               r["score"], r.get("reconstruct", ""),
                                                               r.get("budget", ""))):
            how = (f"gqaprune {r['score']}, rotate {r['rotate']}, reconstruct {r['reconstruct']}"
                   + (f" (reconstruct_holdout {r['holdout']})" if "holdout" in r else "")
                   if r["method"] == "gqaprune"
                   else "SliceGPT (per-layer rotation + shortcuts)" + (
                       ", at gqaprune rotate-pca's parameter count" if r.get("budget") == "params" else "")
                   if r["method"] == "slicegpt" else f"Torch-Pruning {r['score']}")
            err = (f"{r['mean_rel_error_slice']:.3f} -> {r['mean_rel_error_lsq']:.3f}"
                   if r.get("mean_rel_error_lsq") is not None else "-")
            rows.append([f"{r['ratio']:.0%}", how, f"{r['hidden_size_before']} -> {r['hidden_size']}",
                         f"{r['params']:,}" + (" (head untied)" if r.get("untied_lm_head") else ""),
                         f"{r['ppl']:.2f}", f"{r['ppl'] / data['dense_ppl']:.2f}x", err, r["seconds"]])
            before = data.get("before", {}).get(key(r))
            rows[-1].append(f"{before['ppl']:.2f}" if before else "")
        parts.append(table(["removed", "method", "hidden", "params", "ppl", "vs dense", "reader error slice -> lsq",
                            "s", "ppl before"], rows))
        if data.get("before"):
            parts.append(f"\n'ppl before': {data.get('before_note', 'the same row before a code change')}.\n")
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--name", default=None, help="name in the results file (default: from --model)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--align", type=int, default=8)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--quick", action="store_true", help="activation only among the scores")
    ap.add_argument("--only", nargs="+", default=None, help="measure only rows whose key contains one of these")
    ap.add_argument("--remeasure", nargs="+", default=None,
                    help="re-run the stored rows whose key contains one of these after a code change, keeping each "
                         "old result as the row's 'before' (shown beside the new one)")
    ap.add_argument("--before-note", default=None, help="what the 'before' rows measured (rendered under the table)")
    ap.add_argument("--holdout", type=float, default=None,
                    help="reconstruct_holdout of the repaired rows (default: the stage's default, not in the key)")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args(argv)
    if args.render:
        write_result("hidden", render())
        return
    torch.manual_seed(0)
    folder = resolve_model(args.model, True)
    name = args.name or args.model.removeprefix("builtin:").replace("/", "_")
    tok = load_tokenizer(folder)
    calib = calibration_windows(tok, "builtin:pydoc", "train", args.samples, 128, seed=0)
    eval_tokens = token_stream(tok, "builtin:pydoc", "validation")[: args.eval_tokens]
    path = RESULTS / f"hidden_{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {"model": args.model, "rows": {}}
    if "dense_ppl" not in data:
        dense = load_pretrained(folder).eval()
        data.update(dense_ppl=perplexity(dense, eval_tokens, 128, None, 8, progress=False)["perplexity"],
                    hidden_size=dense.config.hidden_size, params=sum(p.numel() for p in dense.parameters()),
                    samples=args.samples, eval_tokens=int(eval_tokens.numel()))
        print(f"dense ppl {data['dense_ppl']:.3f}", flush=True)
    planned = {key(row) for ratio in args.ratios for row in rows_for(ratio, args.quick, args.holdout)
               if not args.only or any(o in key(row) for o in args.only)}
    for k in [k for k in data["rows"] if k in planned and args.remeasure and any(o in k for o in args.remeasure)]:
        data.setdefault("before", {})[k] = data["rows"].pop(k)
        data["before_note"] = args.before_note or data.get("before_note")
    for ratio in args.ratios:
        for row in rows_for(ratio, args.quick, args.holdout):
            if key(row) in data["rows"] or (args.only and not any(o in key(row) for o in args.only)):
                continue
            try:
                result = measure(row, folder, calib, eval_tokens, args.align)
            except (NotImplementedError, RuntimeError) as e:
                result = {**row, "error": str(e)}
                print(f"{key(row)}: {e}", flush=True)
                continue
            data["rows"][key(row)] = result
            if path.exists():  # rows another run wrote meanwhile stay (this run's rows win on the same key)
                on_disk = json.loads(path.read_text()).get("rows", {})
                data["rows"].update({k: v for k, v in on_disk.items()
                                     if k not in data["rows"] and k not in data.get("before", {})})
            print(f"{key(row)}: ppl {result['ppl']:.3f} hidden {result['hidden_size']} params {result['params']:,} "
                  f"({result['seconds']}s)", flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)
    write_result("hidden", render())


if __name__ == "__main__":
    main()
