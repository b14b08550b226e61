"""Scale: a random-init model of TinyLlama-1.1B's shape pruned end to end in memory on this CPU.

LlamaConfig: 22 layers, hidden 2048, 32 query / 4 KV heads, head_dim 64, MLP 5632, vocab 32000
(1.1B parameters, fp32). Taylor scores, half the KV groups (uniform) and 25% of the MLP channels,
least-squares repair, 2,048 calibration tokens (16 x 128, batches of 8), driven through the stage
classes exactly as the runner drives them. Reports the wall time and peak RSS of every phase
(model build, each stage's scoring pass, each stage's surgery + repair, a perplexity pass on 2,048
tokens, save to a temporary folder) and, in the same run on the unpruned model, one plain forward +
backward over the same 2,048 tokens (LM loss, every parameter requiring grad) for comparison.

    python -m benchmarks.scale [--threads 2] [--label after]

Each run stores its numbers in benchmarks/results/scale_<label>.json; results/scale.md shows every
stored label side by side (e.g. "before" = float64 Gram accumulation, "after" = the current code).
Not part of the test suite: it needs ~13 GiB of RAM and takes 10-20 minutes on a quiet 2-core
machine (about an hour on a busy one). ``--render`` rewrites scale.md from the stored results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import torch
import transformers as tf

from benchmarks.common import RESULTS, context, rss_mb, table, write_result

SHAPE = dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
             intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so each phase's RSS reflects live memory and not
    what an earlier phase freed (the reference backward's gradients, say)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Phases:
    """Wall time and peak RSS (sampled every 20 ms by a thread) of named phases."""

    def __init__(self):
        self.rows: list[dict] = []
        self._peak = 0.0
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop:
            self._peak = max(self._peak, rss_mb())
            time.sleep(0.02)

    @contextmanager
    def phase(self, name: str, **extra):
        gc.collect()
        _trim()
        start_rss = rss_mb()
        self._peak = start_rss
        t = time.perf_counter()
        row = {"phase": name, **extra}
        try:
            yield row
        finally:
            row["seconds"] = time.perf_counter() - t
            row["rss_start_mb"] = start_rss
            row["peak_rss_mb"] = max(self._peak, rss_mb())
            self.rows.append(row)
            print(f"[scale] {name}: {row['seconds']:.1f}s, peak RSS {row['peak_rss_mb'] / 1024:.2f} GB "
                  f"(start {start_rss / 1024:.2f} GB) {extra or ''}", file=sys.stderr, flush=True)

    def close(self):
        self._stop = True


def build_model(layers: int | None = None):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**SHAPE, **({"num_hidden_layers": layers} if layers else {})}, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return tf.LlamaForCausalLM(cfg).eval()


def forward_backward(model, calib: torch.Tensor, batch_size: int) -> None:
    """A plain training step's compute: LM loss, every parameter requiring grad, gradients accumulated."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    for b in range(0, calib.shape[0], batch_size):
        ids = calib[b: b + batch_size]
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for p, f in zip(model.parameters(), flags):
        p.grad = None
        p.requires_grad_(f)


def _gram_info(row: dict, stats) -> None:
    row["gram_mb"] = sum(g.numel() * g.element_size() for g in stats.gram.values()) / 2**20
    row["gram_dtype"] = str(next(iter(stats.gram.values())).dtype).removeprefix("torch.") if stats.gram else None


def _split_stage(phases: Phases, stage_name: str, module, legacy_gram: bool = False):
    """Wrap the module's collect_stats (gqaprune.scoring.gather, which the stages call) so the scoring pass is its own phase; returns the restore fn.
    With ``legacy_gram``, first run the same pass with float64 Grams (the previous default), for comparison."""
    real = module.collect_stats
    holder: dict = {}

    def wrapped(*a, **kw):
        if legacy_gram and kw.get("gram"):
            with phases.phase(f"{stage_name}: scoring pass, float64 Grams (previous default)") as row:
                legacy = real(*a, **kw, gram_dtype=torch.float64)
                _gram_info(row, legacy)
            del legacy
        with phases.phase(f"{stage_name}: scoring pass") as row:
            stats = real(*a, **kw)
            _gram_info(row, stats)
        _trim()
        holder["t_end"] = time.perf_counter()
        holder["rss_after"] = phases._peak = rss_mb()  # the surgery + repair phase starts here
        return stats

    module.collect_stats = wrapped
    return holder, lambda: setattr(module, "collect_stats", real)


def run(args) -> dict:
    import gqaprune.scoring.gather as gather_mod  # both stages' scoring pass: gather_stats -> collect_stats
    from gqaprune.arch.adapter import resolve_adapter
    from gqaprune.io.checkpoint import save_model
    from gqaprune.evaluation.perplexity import perplexity
    from gqaprune.recipe import HeadPruneStage, NeuronPruneStage
    from gqaprune.stages.head_prune import HeadPrune
    from gqaprune.stages.neuron_prune import NeuronPrune

    torch.set_num_threads(args.threads)
    phases = Phases()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, SHAPE["vocab_size"], (args.samples, args.seq_len), generator=gen)
    eval_tokens = torch.randint(0, SHAPE["vocab_size"], (args.samples * args.seq_len,), generator=gen)

    with phases.phase("model build (random init)"):
        model = build_model(args.layers)
    params0 = sum(p.numel() for p in model.parameters())
    if not args.skip_fwd_bwd:
        with phases.phase("reference: forward + backward (all params, LM loss)"):
            forward_backward(model, calib, args.batch_size)

    stages = [
        ("head_prune", gather_mod, HeadPrune, HeadPruneStage,
         {"type": "head_prune", "unit": "group", "prune_ratio": 0.5, "score": "taylor",
          "reconstruct": "least_squares", "allocation": "uniform"}),
        ("neuron_prune", gather_mod, NeuronPrune, NeuronPruneStage,
         {"type": "neuron_prune", "prune_ratio": 0.25, "score": "taylor", "align": 64,
          "reconstruct": "least_squares", "allocation": "uniform"}),
    ]
    stage_reports = {}
    for name, module, cls, cfg_cls, cfg in stages:
        holder, restore = _split_stage(phases, name, module, legacy_gram=args.legacy_gram and name == "neuron_prune")
        try:
            ctx = context(model, calib, cfg, batch_size=args.batch_size)
            t0 = time.perf_counter()
            rep = cls(cfg_cls(**cfg)).apply(ctx)
            t1 = time.perf_counter()
            # the rest of the stage after its scoring pass: score reading, surgery, least-squares repair
            phases.rows.append({"phase": f"{name}: surgery + repair", "seconds": t1 - holder["t_end"],
                                "rss_start_mb": holder["rss_after"], "peak_rss_mb": max(phases._peak, rss_mb())})
            print(f"[scale] {name}: surgery + repair {t1 - holder['t_end']:.1f}s", file=sys.stderr, flush=True)
            stage_reports[name] = {"seconds": t1 - t0, "scoring_seconds": rep["scoring_seconds"],
                                   "rel_error_lsq_mean": _mean_err(rep)}
        finally:
            restore()
        del ctx
    params1 = sum(p.numel() for p in model.parameters())

    with phases.phase(f"perplexity pass ({eval_tokens.numel()} tokens)"):
        ppl = perplexity(model, eval_tokens, seq_len=args.seq_len, batch_size=args.batch_size, progress=False)
    tmp = tempfile.mkdtemp(prefix="gqaprune-scale-")
    try:
        with phases.phase("save (safetensors, temp dir)") as row:
            adapter = resolve_adapter("auto", model.config.architectures)
            save_model(model, adapter, tmp, dtype=torch.float32)
            row["bytes"] = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    phases.close()
    import resource

    return {
        "label": args.label, "layers": args.layers or SHAPE["num_hidden_layers"], "threads": args.threads, "samples": args.samples, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "params_before": params0, "params_after": params1,
        "perplexity_random_tokens": ppl["perplexity"], "phases": phases.rows, "stages": stage_reports,
        "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "transformers": tf.__version__},
        "command": " ".join(["python -m benchmarks.scale"] + sys.argv[1:]),
    }


def _mean_err(rep: dict) -> float | None:
    errs = [l["rel_error_lsq"] for l in rep.get("layers", []) if "rel_error_lsq" in l]
    return sum(errs) / len(errs) if errs else None


def markdown(results: list[dict]) -> str:
    out = ["## Scale: TinyLlama-1.1B shape, end to end in memory (CPU)", "",
           "`python -m benchmarks.scale --label LABEL` — random-init LlamaConfig with TinyLlama-1.1B's shape "
           "(22 layers, hidden 2048, 32 Q / 4 KV heads, head_dim 64, MLP 5632, vocab 32000; fp32), driven through "
           "`HeadPrune` / `NeuronPrune` as the runner drives them: Taylor scores, half the KV groups (uniform) and "
           "25% of the MLP channels (5632 -> 4224), least-squares repair, 2,048 calibration tokens (16 x 128, "
           "batches of 8). Peak RSS is sampled every 20 ms within each phase. The reference forward + backward "
           "runs first, on the unpruned model, over the same 2,048 tokens (LM loss, every parameter requiring "
           "grad, gradients kept). Between phases freed heap memory is handed back to the OS (`malloc_trim`), so "
           "a phase's peak reflects its own live memory. With float64 Grams (the previous default) the "
           "neuron stage's scoring pass is run once more, before the real one, for comparison.", ""]
    for r in results:
        ref = next((p for p in r["phases"] if p["phase"].startswith("reference")), None)
        rows = []
        for p in r["phases"]:
            ratio = ""
            if ref and "scoring pass" in p["phase"]:
                ratio = f"{p['seconds'] / ref['seconds']:.2f}x"
            gram = f"{p['gram_mb'] / 1024:.2f} GiB ({p['gram_dtype']})" if p.get("gram_mb") else ""
            peak = p["peak_rss_mb"]
            rows.append([p["phase"], f"{p['seconds']:.1f}", "-" if peak != peak else f"{peak / 1024:.2f}", gram, ratio])
        m = r["machine"]
        out += [f"### {r['label']}", ""] + ([r["note"], ""] if r.get("note") else []) + [
                f"`{r['command']}`; {r['threads']} torch threads on {m['cores']} cores "
                f"(1-minute load average {m['load_avg_1m']:.1f} at the end: the machine is shared), torch "
                f"{m['torch']}, transformers {m['transformers']}. Parameters {r['params_before']:,} -> "
                f"{r['params_after'] and format(r['params_after'], ',') or 'n/a'}. Peak RSS of the whole process: {r['peak_rss_mb_process'] / 1024:.2f} GiB.", "",
                table(["phase", "seconds", "peak RSS GiB", "Gram matrices held", "vs fwd+bwd"], rows), ""]
        own = [p for p in r["phases"] if not p["phase"].startswith("reference") and "previous default" not in p["phase"]
               and p["peak_rss_mb"] == p["peak_rss_mb"]]
        legacy = [p for p in r["phases"] if "previous default" in p["phase"]]
        scoring = [p for p in own if p["phase"].endswith("scoring pass")]
        if ref and own:
            line = (f"Pruning's own peak RSS: {max(p['peak_rss_mb'] for p in own) / 1024:.2f} GiB "
                    f"(the reference forward + backward: {ref['peak_rss_mb'] / 1024:.2f} GiB). Scoring passes cost "
                    + ", ".join(f"{p['seconds'] / ref['seconds']:.2f}x" for p in scoring)
                    + " of one forward + backward")
            if legacy:
                new = next(p for p in scoring if p["phase"].startswith(legacy[0]["phase"].split(":")[0]))
                line += (f"; float64 Grams would raise the neuron scoring pass's peak from "
                         f"{new['peak_rss_mb'] / 1024:.2f} to {legacy[0]['peak_rss_mb'] / 1024:.2f} GiB")
            out += [line + ".", ""]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--label", default="after")
    ap.add_argument("--skip-fwd-bwd", action="store_true")
    ap.add_argument("--no-legacy-gram", dest="legacy_gram", action="store_false",
                    help="skip the extra neuron scoring pass with float64 Grams (the previous default)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick check of this script")
    ap.add_argument("--render", action="store_true", help="only rewrite results/scale.md from the stored results")
    args = ap.parse_args(argv)
    if not args.render:
        res = run(args)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"scale_{args.label}.json").write_text(json.dumps(res, indent=2) + "\n")
    stored = sorted(RESULTS.glob("scale_*.json"), key=lambda p: (p.stem != "scale_before", p.stem))
    write_result("scale", markdown([json.loads(p.read_text()) for p in stored]))


if __name__ == "__main__":
    main()
