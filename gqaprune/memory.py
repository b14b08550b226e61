"""Estimated peak memory of a run, in-memory and layer-wise, from the shapes alone (no weights loaded).

Each estimate is the largest, over the stages (and, layer-wise, the two ends of the run), of the sum of what
that stage holds at once:
- weights: the parameters resident in the run dtype (in-memory: the whole model; layer-wise sweeps: the
  largest decoder layer only; the ends: the embeddings while embedding the calibration windows, or the final
  norm and lm_head for the last logits, whichever is larger);
- dense_copy: in-memory sequential repair and distillation keep a copy of the model before the stage;
- gradients: Taylor scores reduce each gradient as it arrives, so one tensor's gradient at a time; a full
  recover stage holds gradients and two Adam moments (fp32) for every parameter;
- grams: Gram matrices X^T X of the scored/repaired projection's inputs in fp32 (in-memory: one per layer at
  once; layer-wise: one layer's), plus the fp64 working set of the solve (gqaprune.ops.reconstruct): the kept
  block damped in place and its Cholesky factor, 2 (k, k) with k the kept width, and the (out, k) right-hand
  side and solution; sequential repair adds its statistics (in-memory: X^T X, X^T X' in fp64; layer-wise:
  nothing more, W X^T X' is the right-hand side); the OBS reconstruction
  score inverts a damped (in, in) Gram (5 fp64 matrices). hidden_prune's reader refit holds the fp64 Gram triple
  of one norm's readers (three with held-out windows: all, held-out, fitting) and its widest reader's solve
  (the LM head when untied), beside a copy of the model before slicing. The layer-drop repair solves one dropped run at a
  time over the MLP width (2 fp64 (inter, inter), plus X^T D in fp32 and fp64 and the fp64 correction);
- corrections: layer-wise, the layer-drop corrections E (hidden, inter) fp32 kept from the repair sweep to
  the main sweep, one per dropped run (counted as one per dropped layer: an upper bound);
- activations: calibration hidden states (layer-wise: one stream per pruning stage plus one, all windows,
  plus the repaired projection's dense inputs when sequential; at the end, the evaluation windows' hidden
  states when eval.perplexity.max_tokens bounds them), one batch's forward, and at the ends of a run its
  logits (the larger of a calibration and an evaluation batch: the fp32 logits, log_softmax's output and its
  working buffer, LOGIT_COPIES), and
  for Taylor the activations autograd keeps for the backward pass (approximate: ~6 hidden + 4 MLP + the
  attention scores per token and layer);
- runtime: the interpreter and libraries (a constant measured on this machine).
Weights and Grams are exact byte counts; activations are an estimate (checked against measured peaks in
benchmarks/RESULTS.md). The layer-wise estimate counts live tensors only: it holds because the layer-wise run
makes glibc return freed large tensors to the OS (gqaprune.execution.allocator); without that, the heap kept
about 0.7 GiB more on the TinyLlama-1.1B shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gqaprune.arch.adapter import Adapter, cfg_get, head_dim_of
from gqaprune.recipe import STAGE_SCORES, default_eval
from gqaprune.schema import held_out_from

GRAM_BYTES = 4  # float32 accumulation (gqaprune.scoring.stats)
SOLVE_BYTES = 8  # float64 solves (gqaprune.ops.reconstruct)
# fp64 (k, k) matrices alive during one least-squares solve: the kept block, damped in place, and its Cholesky factor
# (plus the (out, k) right-hand side and solution)
SOLVE_MATRICES = 2
# fp64 (in, in) matrices of the OBS reconstruction score (gqaprune.scoring.obs): the widened Gram, the identity,
# the damped sum and the pseudo-inverse with its SVD factors
OBS_MATRICES = 5
# fp32 (tokens, vocab) buffers alive while a batch's perplexity is taken (gqaprune.evaluation.perplexity.batch_nll):
# the logits, log_softmax's output and its working buffer (measured: the evaluation phase of
# benchmarks/layerwise_scale.py peaks at about three logits tensors above its baseline)
LOGIT_COPIES = 3
RUNTIME_BYTES = 450 * 2**20  # Python, torch, transformers and the tokenizer before any tensor (measured, CPU)


@dataclass
class MemoryEstimate:
    mode: str  # in_memory | layerwise
    parts: dict[str, int] = field(default_factory=dict)  # bytes at the peak stage
    peak_stage: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        return {"mode": self.mode, "peak_stage": self.peak_stage, "total_bytes": self.total, "parts": self.parts}


def layer_param_counter(config, adapter: Adapter):
    """shape -> parameters of one decoder layer of that shape (biases and norms included): a meta-device layer
    of the model, reshaped (no memory)."""
    import copy

    from gqaprune.arch.adapter import decoder_layers
    from gqaprune.arch.modeling_perlayer import reshape_layer
    from gqaprune.plan import meta_model

    proto = decoder_layers(meta_model(config), adapter)[0]
    hidden, hd = int(cfg_get(config, adapter, "hidden_size")), head_dim_of(config, adapter)
    cache: dict[tuple, int] = {}

    def count(s: dict) -> int:
        key = (s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"])
        if key not in cache:
            layer = copy.deepcopy(proto)
            reshape_layer(layer, adapter.layer.model_dump(), dict(s), hd, hidden, config)
            cache[key] = sum(p.numel() for p in layer.parameters())
        return cache[key]
    return count


def _role_width(stage_type: str, s: dict, head_dim: int) -> int:
    """Input width of the projection a stage scores/repairs: o (heads) or down (MLP channels)."""
    return s["num_attention_heads"] * head_dim if stage_type == "head_prune" else s["intermediate_size"]


def _prune_grams(st, score, sequential: bool, widths: list[int], kept: list[int], hidden: int,
                 held_tokens: int = 0) -> tuple[int, int]:
    """(in-memory, layer-wise) bytes of a head/neuron stage's Grams and solve working set; widths/kept: the
    role's input width per layer before and after the stage; held_tokens: the held-out calibration tokens whose
    inputs a one-shot repair keeps (fp32, beside each Gram), whose candidate solves hold one more (k, k) fp64
    matrix (the fit block they are all solved from), one more (out, k) (the fit right-hand side) and the held-out
    tokens' inputs and outputs in fp64."""
    want_gram = (st.reconstruct == "least_squares" and not sequential) or "gram" in score.needs
    lsq = st.reconstruct == "least_squares"
    held = held_tokens if lsq and not sequential else 0
    mem = sum(w * w + held * w for w in widths) * GRAM_BYTES if want_gram else 0
    lw = 0
    for w, k in zip(widths, kept):
        one = (w * w + held * w) * GRAM_BYTES if want_gram else 0
        obs = OBS_MATRICES * w * w * SOLVE_BYTES if "gram" in score.needs else 0
        solve = ((SOLVE_MATRICES + (held > 0)) * k * k + (2 + (held > 0)) * hidden * k + held * (w + hidden)) \
            * SOLVE_BYTES if lsq else 0
        if sequential:  # in memory: X^T X, X^T X' and X'^T X' (copied for the solve); layer-wise: W X^T X' (the rhs)
            lw = max(lw, one + max(obs, solve))
            mem_seq = (w * w + w * k + k * k) * SOLVE_BYTES + solve
        else:
            lw = max(lw, one + max(obs, solve))
            mem_seq = 0
        mem = max(mem, (sum(x * x + held * x for x in widths) * GRAM_BYTES if want_gram else 0)
                  + max(obs, solve, mem_seq))
    return mem, lw


def _drop_repair(inter: int, hidden: int, n_drop: int) -> tuple[int, int, int]:
    """Layer-drop repair: (in-memory grams, layer-wise grams, layer-wise corrections held afterwards). One run's
    solve holds C widened to fp64 (its fp32 accumulator freed first) and damped in place, its Cholesky factor,
    X^T D in fp32 and fp64 and the fp64 correction; in memory the fp32 statistics (C, X^T D) of every dropped run
    are held as well (counted per dropped layer), layer-wise the fp32 corrections of the runs solved before."""
    solve = (SOLVE_MATRICES * inter * inter + 2 * inter * hidden) * SOLVE_BYTES + inter * hidden * GRAM_BYTES
    correction = hidden * inter * 4
    stats = (inter * inter + inter * hidden) * GRAM_BYTES
    return n_drop * stats + solve, solve + (n_drop - 1) * correction, n_drop * correction


def _hidden_repair(hidden: int, kept: int, out: int, held: bool) -> int:
    """hidden_prune's reader refit (gqaprune.ops.hidden): the fp64 Gram triple (X^T X, X^T X', X'^T X') of one
    norm's readers over every token, and with held-out windows the held-out tokens' triple and the fitting one;
    the widest reader's (``out`` rows) solve: the damped (k, k) block and its Cholesky factor, its weight W and
    W_K, the right-hand side and the solution."""
    triple = hidden * hidden + hidden * kept + kept * kept
    return ((3 if held else 1) * triple + SOLVE_MATRICES * kept * kept + out * (hidden + 3 * kept)) * SOLVE_BYTES


def _held_corrections(recipe, shapes: list[dict], hidden: int) -> int:
    """Layer-wise: bytes of the layer-drop corrections a repaired first-stage drop holds until the end (else 0)."""
    first = recipe.stages[0] if recipe.stages else None
    if first is None or first.type != "layer_drop" or first.reconstruct != "least_squares":
        return 0
    n_drop = first.num_layers if first.num_layers is not None else max(1, round(first.fraction * len(shapes)))
    return _drop_repair(max(s["intermediate_size"] for s in shapes), hidden, n_drop)[2]


def estimate(recipe, config, adapter: Adapter, plans, dtype_bytes: int, layer_params=None) -> dict[str, MemoryEstimate]:
    """Peak memory of ``recipe`` in both pipelines. ``plans``: gqaprune.plan.simulate's output (shapes before
    and after each stage); ``layer_params(shape) -> int`` counts one decoder layer's parameters (default: from
    the adapter's roles)."""
    b = dtype_bytes
    hidden = int(cfg_get(config, adapter, "hidden_size"))
    hd = head_dim_of(config, adapter)
    vocab = int(getattr(config, "vocab_size"))
    cal = recipe.calibration
    tokens, batch_tokens = cal.samples * cal.seq_len, min(cal.batch_size, cal.samples) * cal.seq_len
    ppl = default_eval(recipe).perplexity
    logit_tokens = max(batch_tokens, ppl.batch_size * ppl.seq_len if ppl is not None else 0)
    eval_stream = ppl.max_tokens * hidden * b if ppl is not None and ppl.max_tokens else 0
    layer_params = layer_params or layer_param_counter(config, adapter)
    source = plans[0]
    non_layer = source.params - sum(layer_params(s) for s in source.per_layer)
    n_prune = sum(st.type in ("head_prune", "neuron_prune") for st in recipe.stages)

    def forward(shapes, logits: bool = True) -> int:  # one batch: residual, MLP, attention scores, fp32 logits
        widest = max(s["intermediate_size"] for s in shapes)
        heads = max(s["num_attention_heads"] for s in shapes)
        return batch_tokens * (4 * hidden + 2 * widest) * b + batch_tokens * heads * cal.seq_len * b \
            + (logit_tokens * vocab * 4 * LOGIT_COPIES if logits else 0)

    corrections = _held_corrections(recipe, source.per_layer, hidden)  # layer-wise, repair sweep to the end
    # the ends of a layer-wise run: embeddings (start) or final norm + lm_head (end), never with a decoder layer
    embed = vocab * hidden
    head = non_layer - (0 if getattr(config, "tie_word_embeddings", False) else embed)
    def _add_taylor(mem: dict, shapes: list[dict]) -> None:  # one gradient at a time, the backward's activations
        mem["gradients"] = max(vocab * hidden, max(layer_params(s) for s in shapes)) * b
        heads = max(s["num_attention_heads"] for s in shapes)
        inter = max(s["intermediate_size"] for s in shapes)
        mem["activations"] += len(shapes) * batch_tokens * (6 * hidden + 4 * inter + heads * cal.seq_len) * b

    best = {"in_memory": MemoryEstimate("in_memory"),
            "layerwise": MemoryEstimate("layerwise", {
                "runtime": RUNTIME_BYTES, "weights": max(embed, head) * b, "corrections": corrections,
                "activations": max((n_prune + 1) * tokens * hidden * b, eval_stream) + forward(source.per_layer)},
                "ends")}
    for k, st in enumerate(recipe.stages):
        if st.type == "awq":
            continue
        shapes, params = plans[k].per_layer, plans[k].params
        L = len(shapes)
        widest_layer = max(layer_params(s) for s in shapes)
        mem = {"runtime": RUNTIME_BYTES, "weights": params * b, "dense_copy": 0, "gradients": 0, "grams": 0,
               "activations": forward(shapes)}
        lw = {"runtime": RUNTIME_BYTES, "weights": widest_layer * b, "dense_copy": 0, "gradients": 0, "grams": 0,
              "corrections": corrections if k > 0 else 0,  # the sweeps run decoder layers only: no logits
              "activations": (n_prune + 1) * tokens * hidden * b + forward(shapes, logits=False)}
        if st.type in ("head_prune", "neuron_prune"):
            widths = [_role_width(st.type, s, hd) for s in shapes]
            kept = [_role_width(st.type, s, hd) for s in plans[k + 1].per_layer]
            score = STAGE_SCORES[st.type][st.score]  # what the score reads, from the registry
            sequential = cal.sequential and st.reconstruct == "least_squares"
            held = held_out_from((cal.samples, cal.seq_len), st.reconstruct_holdout)
            mem["grams"], lw["grams"] = _prune_grams(st, score, sequential, widths, kept, hidden,
                                                     tokens - held if held is not None else 0)
            if sequential:
                mem["dense_copy"] = params * b
                lw["activations"] += tokens * max(widths) * b  # the dense inputs of the repaired projection
            if score.needs_gradients:
                _add_taylor(mem, shapes)
        elif st.type == "hidden_prune":
            if st.score == "taylor":
                _add_taylor(mem, shapes)
            if st.reconstruct == "least_squares":
                mem["dense_copy"] = params * b  # the model before slicing: the readers' targets
                width, kept = plans[k].hidden_size or hidden, plans[k + 1].hidden_size
                held = held_out_from((cal.samples, cal.seq_len), st.reconstruct_holdout) is not None
                untied = st.rotate == "pca" or not getattr(config, "tie_word_embeddings", False)
                widest = max([vocab] * untied + [max(s["num_attention_heads"], s["num_key_value_heads"]) * hd
                                                 for s in shapes] + [s["intermediate_size"] for s in shapes])
                mem["grams"] = _hidden_repair(width, kept, widest, held)
                mem["activations"] += 2 * tokens * width * b  # every token's input to the layer, dense and sliced
        elif st.type == "layer_drop":
            inter = max(s["intermediate_size"] for s in shapes)
            mem["activations"] += (L + 1) * batch_tokens * hidden * 4
            n_drop = st.num_layers if st.num_layers is not None else max(1, round(st.fraction * L))
            if st.reconstruct == "least_squares":
                mem["grams"], lw["grams"], _ = _drop_repair(inter, hidden, n_drop)
                lw["activations"] += tokens * (inter + hidden) * 4
            gap = 1 if st.score == "block_influence" else n_drop
            lw["activations"] += (gap + 1) * tokens * hidden * 4
        elif st.type == "recover":
            mem["gradients"] = 3 * params * 4 if st.method == "full" else 0
            mem["activations"] += L * batch_tokens * (6 * hidden + 4 * max(s["intermediate_size"] for s in shapes)
                                                      + max(s["num_attention_heads"] for s in shapes) * cal.seq_len) * b
            if st.method == "distill":
                mem["dense_copy"] = source.params * b
        candidates = [("in_memory", mem), ("layerwise", lw)]
        if st.type == "layer_drop" and st.reconstruct == "least_squares":  # the solve runs with no layer loaded
            candidates.append(("layerwise", dict(lw, weights=0)))
            lw["grams"] = 0  # ... and the sweep holds a layer without the solve
        for mode, parts in candidates:
            if sum(parts.values()) > best[mode].total:
                best[mode] = MemoryEstimate(mode, parts, f"{k}:{st.type}")
    return best


def device_memory() -> tuple[str, int]:
    """(what, bytes) the run can use: the first GPU's memory when CUDA is present, else this machine's RAM."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}", int(torch.cuda.get_device_properties(0).total_memory)
    try:
        import psutil

        return "RAM", int(psutil.virtual_memory().total)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return "RAM", int(line.split()[1]) * 1024
    return "RAM", 0


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run_dtype_bytes(recipe) -> int:
    """Bytes per weight in the run dtype (runtime.dtype auto: bf16 on CUDA, fp32 on CPU, as the runner picks)."""
    import torch

    dt = recipe.runtime.dtype
    if dt == "auto":
        dt = "bfloat16" if (recipe.runtime.device != "cpu" and torch.cuda.is_available()) else "float32"
    return 4 if dt == "float32" else 2


def memory_lines(recipe, config, adapter, plans) -> tuple[list[str], str | None]:
    """(the plan's memory section, a warning when the chosen pipeline will not fit the device, or None)."""
    from gqaprune.io.placement import placement_budget

    b = run_dtype_bytes(recipe)
    est = estimate(recipe, config, adapter, plans, b)
    what, avail = placement_budget(recipe.runtime) if recipe.runtime.device_map else device_memory()
    chosen = recipe.calibration.pipeline
    lines = [f"peak memory (estimated from shapes, run dtype {b} B/weight; {what} {gib(avail)}):"]
    for mode in ("in_memory", "layerwise"):
        e = est[mode]
        parts = ", ".join(f"{k} {gib(v)}" for k, v in e.parts.items() if v)
        fits = "fits" if e.total <= avail else "does NOT fit"
        mark = " (chosen)" if mode == chosen else ""
        lines.append(f"  {mode:<10}{gib(e.total):>12}  {fits}{mark}; at stage {e.peak_stage}: {parts}")
    warning = None
    if est[chosen].total > avail:
        other = "layerwise" if chosen == "in_memory" else "in_memory"
        warning = (f"calibration.pipeline {chosen} needs about {gib(est[chosen].total)} (estimated) but {what} has "
                   f"{gib(avail)}; {other} needs about {gib(est[other].total)}")
    return lines, warning
