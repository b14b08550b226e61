"""Layer-wise vs in-memory: the same recipe on a random-init Llama shape, peak RSS and wall time side by side.

The model is written as bf16 safetensors one decoder layer per shard, without ever holding the model
(each tensor is drawn, written with its layer, and freed). Each pipeline then runs `gqaprune run` in its
own process (so each peak RSS is that run's own), with the same recipe: drop N layers (block influence,
least-squares repair), half the KV groups (activation scores), 25% of the MLP channels (activation), all
repaired by least squares with calibration.sequential: true (the setting under which both pipelines give
the same model), fp32 run dtype; evaluation is perplexity on 1,024 held-out tokens (no lm-eval). The
plan's estimate (gqaprune.memory) is printed beside each measurement.

    python -m benchmarks.layerwise_scale --shape mid [--modes layerwise,in_memory] [--tokens 2048]

Shapes: small (8 layers, hidden 512, 8 Q / 4 KV, MLP 1408, vocab 32000: 50M), mid (16 layers, hidden 1024, 16 Q / 4 KV, MLP 2816, vocab 32000: 0.27B), tinyllama (1.1B),
llama3-8b (32 layers, hidden 4096, 32 Q / 8 KV, MLP 14336, vocab 128256: 8.0B). Results go to
benchmarks/results/layerwise_<shape>.json and are rendered into benchmarks/results/layerwise.md.
`--estimate-only` prints the plan's estimate without running (used for Llama-3-70B on paper).
`--layers N` keeps a shape's width with N decoder layers and drops one layer (e.g. the 8B width with 4 layers,
to measure the layer-wise peak without writing 16 GB); results then go to layerwise_<shape>_<N>L.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, rss_mb

SHAPES = {
    "small": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=1408, vocab_size=32000),
    "mid": dict(num_hidden_layers=16, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                intermediate_size=2816, vocab_size=32000),
    "tinyllama": dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=64, intermediate_size=5632, vocab_size=32000),
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, vocab_size=128256),
    "llama3-70b": dict(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=128, intermediate_size=28672, vocab_size=128256),
}
DROP = {"small": 1, "mid": 2, "tinyllama": 2, "llama3-8b": 4, "llama3-70b": 8}


def config_of(shape: str, layers: int | None = None):
    import transformers as tf

    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = tf.LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def write_random_model(shape: str, folder: Path, layers: int | None = None) -> None:
    """bf16 safetensors, one shard per decoder layer (plus one for the rest), drawn tensor by tensor."""
    from accelerate import init_empty_weights
    import transformers as tf

    from gqaprune.builtin.tiny import load_builtin_tokenizer
    from gqaprune.execution.weights import ShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config_of(shape, layers)
    tok = load_builtin_tokenizer(progress=False)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    with init_empty_weights():
        shell = tf.LlamaForCausalLM(cfg)
    names = {n: tuple(p.shape) for n, p in shell.state_dict().items()}
    groups: dict[str, dict] = {}
    for n, s in names.items():
        key = ".".join(n.split(".")[:3]) if n.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[n] = s
    writer = ShardWriter(folder, len(groups), torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for i, (key, tensors) in enumerate(groups.items()):
        out = {}
        for n, s in tensors.items():
            t = torch.ones(s) if "norm" in n else torch.randn(s, generator=gen) * 0.02
            out[n] = t.to(torch.bfloat16)
        writer.write(out)
        del out
        print(f"wrote {key} ({i + 1}/{len(groups)})", flush=True)
    writer.finish()
    cfg.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


RECIPE = """model: {model}
output: {out}
runtime: {{dtype: float32, threads: {threads}}}
calibration: {{samples: {samples}, seq_len: 128, batch_size: 8, sequential: true, pipeline: {mode}}}
eval: {{perplexity: {{max_tokens: 1024, seq_len: 128, batch_size: 8}}, lm_eval: {{tasks: []}}}}
stages:
  - {{type: layer_drop, num_layers: {drop}, score: block_influence}}
  - {{type: head_prune, unit: group, prune_ratio: 0.5, score: activation}}
  - {{type: neuron_prune, prune_ratio: 0.25, score: activation, align: 64}}
"""


def drop_of(shape: str, layers: int | None) -> int:
    return 1 if layers else DROP[shape]


def estimate(shape: str, mode: str, tokens: int, layers: int | None = None) -> dict:
    from gqaprune import memory
    from gqaprune.arch.adapter import resolve_adapter
    from gqaprune.plan import simulate
    from gqaprune.recipe import parse_recipe

    recipe = parse_recipe(RECIPE.format(model="x", out="o", samples=tokens // 128, mode=mode,
                                        drop=drop_of(shape, layers), threads=1))
    cfg = config_of(shape, layers)
    adapter = resolve_adapter("llama", None)
    plans = simulate(recipe, cfg, adapter)
    return {m: e.as_dict() for m, e in memory.estimate(recipe, cfg, adapter, plans, 4).items()}


class PeakWatch:
    """Samples this process's RSS every 20 ms on a thread; at each new peak records where the main thread is
    (its gqaprune/benchmark frames), so the phase that sets the peak is named rather than guessed; also the
    largest RSS seen in each phase (the call under the runner's pipeline function)."""

    def __init__(self, every: float = 0.02):
        import threading

        self.every, self.where, self.timeline, self.phases, self._peak = every, [], [], {}, 0
        self._main, self._stop = threading.main_thread().ident, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import traceback

        start, last_t = time.perf_counter(), -1
        while not self._stop.wait(self.every):
            rss, now = int(rss_mb() * 2**20), time.perf_counter() - start
            if int(now) // 10 != last_t:  # one timeline point per 10 s
                last_t = int(now) // 10
                self.timeline.append([round(now, 1), round(rss / 2**30, 3)])
            frame = sys._current_frames().get(self._main)
            stack = [f"{Path(f.filename).name}:{f.name}:{f.lineno}" for f in traceback.extract_stack(frame)
                     if "gqaprune" in f.filename] if frame else []
            tops = [i for i, f in enumerate(stack) if ":run_layerwise:" in f or ":_run_inner:" in f]
            phase = stack[tops[-1] + 1] if tops and tops[-1] + 1 < len(stack) else "other"
            self.phases[phase] = max(self.phases.get(phase, 0), round(rss / 2**30, 3))
            if rss > self._peak + 2**24:
                self._peak = rss
                self.where = [round(rss / 2**30, 3), round(now, 1), stack[-8:]]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _child(model: Path, mode: str, tokens: int, drop: int, out: Path, threads: int) -> None:
    """One `gqaprune run` in this process; prints its wall time and peak RSS as JSON on the last line."""
    from gqaprune.runner import run

    recipe = out.parent / f"recipe_{mode}.yaml"
    recipe.write_text(RECIPE.format(model=model, out=out, samples=tokens // 128, mode=mode, drop=drop, threads=threads))
    t = time.perf_counter()
    with PeakWatch() as watch:
        report = run(str(recipe), force=True, progress=False)
    print(json.dumps({"mode": mode, "seconds": round(time.perf_counter() - t, 1),
                      "rss_peak_where": watch.where, "rss_by_phase_gib": watch.phases,
                      "rss_timeline_gib": watch.timeline,
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "params_before": report["params_before"], "params_after": report["params_after"],
                      "ppl_before": report["eval"]["before"].get("perplexity"),
                      "ppl_after": report["eval"]["after"].get("perplexity"),
                      "roundtrip": report["roundtrip"]["max_abs_logit_diff"],
                      "timings": report["timings_seconds"], "stages": [s.get("seconds") for s in report["stages"]],
                      "pipeline": report.get("pipeline")}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    ap.add_argument("--modes", default="layerwise,in_memory")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--estimate-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="runtime.threads of the pruning runs")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of decoder layers (drop 1)")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "OUT"))
    args = ap.parse_args()
    if args.child:
        _child(Path(args.child[0]), args.child[1], args.tokens, drop_of(args.shape, args.layers), Path(args.child[2]),
               args.threads)
        return
    if args.layers is not None and args.layers < 3:
        sys.exit(f"--layers: {args.layers} is too few; use at least 3 (one is dropped, the first and last are kept)")
    est = estimate(args.shape, "layerwise", args.tokens, args.layers)
    print(json.dumps({"estimate_bytes": {m: e["total_bytes"] for m, e in est.items()}}), flush=True)
    if args.estimate_only:
        for m, e in est.items():
            print(m, f"{e['total_bytes'] / 2**30:.2f} GiB", {k: f"{v / 2**30:.2f}" for k, v in e["parts"].items()})
        return
    config = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    result = {"shape": args.shape, "config": config, "drop": drop_of(args.shape, args.layers), "tokens": args.tokens,
              "threads": args.threads,
              "estimate": est, "runs": {}}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        model = Path(tmp) / "model"
        t = time.perf_counter()
        write_random_model(args.shape, model, args.layers)
        result["write_seconds"] = round(time.perf_counter() - t, 1)
        for mode in args.modes.split(","):
            layers = ["--layers", str(args.layers)] if args.layers else []
            proc = subprocess.run([sys.executable, "-m", "benchmarks.layerwise_scale", "--shape", args.shape, *layers,
                                   "--tokens", str(args.tokens), "--threads", str(args.threads),
                                   "--child", str(model), mode, str(Path(tmp) / mode)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                result["runs"][mode] = {"error": proc.stderr.strip().splitlines()[-1:]}
            else:
                result["runs"][mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(result["runs"][mode]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    name = f"layerwise_{args.shape}" + (f"_{args.layers}L" if args.layers else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
