"""calibration.pipeline: layerwise — prune a model one decoder layer at a time, never holding it whole.

The calibration windows go through the embeddings once; from then on the run works on cached hidden
states. A *sweep* visits the decoder layers in order: it reads one layer's tensors from the source
safetensors (gqaprune.execution.weights), runs the cached hidden states through it, applies the
recipe's stages to that layer, and frees it before the next one is read.

The result is the same as the in-memory run with ``calibration.sequential: true``, where stage k
scores every layer of the model left by stages < k, and repairs layer i against the model before
stage k given the inputs the already pruned layers < i of stage k produce. To reproduce that one layer
at a time the run keeps K+1 hidden-state streams for K pruning stages: stream k is the input of the
current layer in the model after stages < k. At layer i, stage k takes its statistics (and its dense
targets) from stream k through the layer as stage k-1 left it, prunes, and repairs with the inputs
of stream k+1 through the pruned layer. Memory: one layer, its statistics, (K+1) x tokens x hidden
activations (and the dense inputs of the repaired projection, tokens x its width).

Sweeps, each reading every kept layer from disk once:
- layer_drop (only as the first stage): a hidden-state sweep for the layer scores (cosines between
  consecutive streams, or n apart for angular_block), then with least_squares a sweep up to the last
  dropped run for the residual repair statistics; dropped layers are never read again.
- every pruning stage with allocation: global: a scoring sweep that applies the stages before it to
  each layer (again: their repairs are recomputed, not stored) and records the stage's scores; the
  allocation is then decided over the whole model. Cost: one more pass of the calibration data through
  the model (and the earlier stages' solves) per global stage.
- the main sweep: every stage on every kept layer, written to the output shards as it finishes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from gqaprune.arch.adapter import decoder_layers, get_module, head_dim_of, layer_shape, model_shapes
from gqaprune.context import RunContext
from gqaprune.execution.weights import (SafetensorsFolder, ShardWriter, build_shell, cast_via, live_layers,
                                        load_non_layer, materialize_layer, release_layer, release_non_layer)
from gqaprune.ops.reconstruct import repair_paired_products, residual_correction
from gqaprune.ops.surgery import drop_layers, prune_channels, prune_heads
from gqaprune.plan import check_layerwise_model
from gqaprune.schema import repair_mode
from gqaprune.scoring.registry import CHANNEL_SCORES, HEAD_SCORES
from gqaprune.scoring.stats import Stats, attach_hooks, role_paths
from gqaprune.stages import STAGES
from gqaprune.stages.base import PlanInput
from gqaprune.stages.head_prune import HeadPrune, choose_heads
from gqaprune.stages.layer_drop import LayerDrop, contiguous_runs
from gqaprune.stages.neuron_prune import NeuronPrune
from gqaprune.stages.output_norms import layer_drop_reconstruct
from gqaprune.stages.repair import hold_from, one_shot_repair, repair_choices


class _Stop(Exception):
    pass


# --- running cached hidden states through one layer ------------------------------------------------


@dataclass
class Stream:
    """Hidden states at one point of the model, per calibration batch (B, T, H), with the keyword
    arguments the model gives its decoder layers for that batch (mask, positions, rotary cos/sin)."""
    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def copy(self) -> "Stream":
        return Stream(list(self.hidden), self.kwargs)


def id_batches(ids: torch.Tensor, batch_size: int) -> list[dict]:
    """The model inputs of each calibration batch: windows ``ids`` (N, T) split as the in-memory passes split them."""
    return [{"input_ids": ids[b: b + batch_size]} for b in range(0, ids.shape[0], batch_size)]


def embed(shell, adapter, batches: list[dict]) -> Stream:
    """Run the model's forward up to its first decoder layer for each batch of model inputs."""
    first = decoder_layers(shell, adapter)[0]
    hidden, kwargs = [], []

    def grab(mod, args, kw):
        hidden.append((args[0] if args else kw.pop("hidden_states")).detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    h = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                with torch.no_grad():
                    shell(**batch, use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return Stream(hidden, kwargs)


def run_layer(layer, stream: Stream) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for h, kw in zip(stream.hidden, stream.kwargs):
            y = layer(h, **kw)
            out.append((y[0] if isinstance(y, tuple) else y).detach())
    return out


def role_inputs(layer, role: str, stream: Stream) -> list[torch.Tensor]:
    """Per batch, the input (tokens, in) of the projection ``role`` of ``layer``; the forward stops there."""
    mod = get_module(layer, role)
    xs = []

    def grab(m, args):
        xs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _Stop

    h = mod.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for hid, kw in zip(stream.hidden, stream.kwargs):
                try:
                    layer(hid, **kw)
                except _Stop:
                    pass
    finally:
        h.remove()
    return xs


def paired_products(w_old: torch.Tensor, cols: torch.Tensor, xs_dense: list[torch.Tensor],
                    xs_kept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """What the sequential repair of W = ``w_old`` (out, in) needs, in float64, batch by batch: W X^T X'_K
    (out, k), X'_K^T X'_K (k, k), ||W X||^2 and slicing's ||W X - W_K X_K||^2 = ||W_R X_R||^2, with X the dense
    inputs (tokens, in) and X'_K the pruned layer's (tokens, k). The same quantities as gqaprune.ops.sequential's
    Grams (X^T X, X^T X', X'^T X') give, without their two (in, in)-sized matrices."""
    w64 = w_old.detach().double().cpu()
    removed = torch.ones(w64.shape[1], dtype=torch.bool)
    removed[cols] = False
    w_r = w64[:, removed]
    w_cross = torch.zeros(w64.shape[0], len(cols), dtype=torch.float64)
    c_kept = torch.zeros(len(cols), len(cols), dtype=torch.float64)
    den = slice_num = 0.0
    for x, xp in zip(xs_dense, xs_kept):
        x, xp = x.double().cpu(), xp.double().cpu()
        y = x @ w64.T  # (tokens, out): the dense output
        den += float(y.pow(2).sum())
        slice_num += float((x[:, removed] @ w_r.T).pow(2).sum())
        w_cross.addmm_(y.T, xp)
        c_kept.addmm_(xp.T, xp)
    return w_cross, c_kept, den, slice_num


# --- one pruning stage on one layer ------------------------------------------------------------------


@dataclass
class StageRun:
    """A head_prune or neuron_prune stage as the layer-wise pipeline runs it."""
    cfg: object
    sequential: bool
    counts: dict  # the stage's plan counts (head_prune: removed, protected; neuron_prune: kept, want)
    decision: dict[int, int] | None = None  # global allocation: layer -> removals (heads) / kept width (neurons)
    scores: dict[int, object] = field(default_factory=dict)  # filled by a scoring sweep
    sq_norms: dict[int, float] = field(default_factory=dict)  # layer -> median over tokens of its input's ||h||^2
    layers: list[dict] = field(default_factory=list)  # report entries
    layer_params: list[int] = field(default_factory=lambda: [0, 0])  # decoder-layer parameters before, after
    seconds: float = 0.0  # time spent on this stage in the main sweep

    @property
    def heads(self) -> bool:
        return self.cfg.type == "head_prune"

    def role(self, adapter) -> str:
        return adapter.layer.o if self.heads else adapter.layer.down

    def needs(self) -> frozenset:
        """The statistics of the stage's score (gqaprune.scoring.base.STATISTICS), plus the Gram matrix a
        one-shot repair solves from."""
        score = (HEAD_SCORES if self.heads else CHANNEL_SCORES)[self.cfg.score]
        assert score.layer_local, f"{self.cfg.score} is not layer-local (recipe.check_layerwise refuses it)"
        one_shot = self.cfg.reconstruct == "least_squares" and not self.sequential
        return score.needs | ({"gram"} if one_shot else set())


def layer_stats(ctx, sr: StageRun, j: int, layer, stream: Stream) -> tuple[Stats, list, list | None]:
    """Stage statistics of layer ``j`` on ``stream``; (stats, the layer's outputs, dense role inputs)."""
    stats = Stats()
    role = sr.role(ctx.adapter)
    needs = sr.needs()
    watched = [role] if needs & {"gram", "input_sq", "head_norm", "fire"} else []
    # keyed by the model's paths (prefix), as gqaprune.scoring.gather keys them, so the scores read them as usual
    handles = attach_hooks(layer, stats, input_paths=watched, head_norm_paths=watched if "head_norm" in needs else [],
                           head_dim=head_dim_of(ctx.model.config, ctx.adapter), gram="gram" in needs,
                           fire_threshold=sr.cfg.frequency_threshold if "fire" in needs else None,
                           prefix=f"{ctx.adapter.model.layers}.{j}.",
                           hold_from=hold_from(sr.cfg, ctx.calib,
                                               repair_mode(ctx.recipe.calibration, sr.cfg.reconstruct)))
    dense = []
    if sr.sequential:
        handles.append(get_module(layer, role).register_forward_pre_hook(
            lambda m, args: dense.append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        out = run_layer(layer, stream)
    finally:
        for h in handles:
            h.remove()
    stats.tokens = sum(h.shape[0] * h.shape[1] for h in stream.hidden)
    return stats, out, (dense if sr.sequential else None)


def layer_scores(ctx, sr: StageRun, j: int, stats: Stats):
    if sr.heads:
        return HeadPrune(sr.cfg).layer_scores(ctx, stats, j)
    width = layer_shape(decoder_layers(ctx.model, ctx.adapter)[j], ctx.adapter,
                        head_dim_of(ctx.model.config, ctx.adapter))["intermediate_size"]
    return NeuronPrune(sr.cfg).layer_scores(ctx, stats, j, width).float()


def _repair_layer(ctx, sr: StageRun, j: int, layer, w_old, cols, stats, dense, pruned_input: Stream) -> dict:
    """Least-squares repair of the role projection after pruning (sequential: against the dense inputs)."""
    c = sr.cfg
    mod = get_module(layer, sr.role(ctx.adapter))
    if sr.sequential:
        w_cross, c_kept, den, slice_num = paired_products(w_old, cols, dense,
                                                          role_inputs(layer, sr.role(ctx.adapter), pruned_input))
        new_w, err = repair_paired_products(w_old, w_cross, c_kept, den, c.reconstruct_damp,
                                             w_old[:, cols])  # consumes c_kept and w_cross
        err["rel_error_slice_dense_inputs"] = slice_num / max(den, 1e-300)
    else:
        path = role_paths(ctx.adapter, j, ["o" if sr.heads else "down"])["o" if sr.heads else "down"]
        new_w, err = one_shot_repair(c, w_old, stats, path, cols)
    with torch.no_grad():
        mod.weight.copy_(new_w)
    return err


def prune_layer(ctx, sr: StageRun, j: int, layer, scores, stats, dense, pruned_input: Stream) -> dict:
    """Apply stage ``sr`` to layer ``j`` (scores given); returns the report entry."""
    c, adapter = sr.cfg, ctx.adapter
    hd = head_dim_of(ctx.model.config, adapter)
    shape = layer_shape(layer, adapter, hd)
    mod = get_module(layer, sr.role(adapter))
    if sr.heads:
        q, grp = scores
        uniform = 0 if j in sr.counts["protected"] else sr.counts["removed"]
        r = sr.decision[j] if sr.decision is not None else uniform
        keep, removed_kv = choose_heads(c.unit, q, grp, r)
        kept_q = sorted(h for qs in keep.values() for h in qs)
        entry = {"layer": j, "removed": r, "group_scores": [float(x) for x in grp],
                 "head_scores": [float(x) for x in q.reshape(-1)], "removed_kv_heads": removed_kv,
                 "removed_q_heads": sorted(set(range(q.numel())) - set(kept_q)),
                 "heads_before": shape["num_attention_heads"], "kv_heads_before": shape["num_key_value_heads"]}
        if r > 0:
            w_old = mod.weight.detach().clone()
            prune_heads(ctx.model, adapter, j, keep)
            cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept_q])
            if c.reconstruct == "least_squares":
                entry.update(_repair_layer(ctx, sr, j, layer, w_old, cols, stats, dense, pruned_input))
        after = layer_shape(layer, adapter, hd)
        entry.update(heads_after=after["num_attention_heads"], kv_heads_after=after["num_key_value_heads"])
        return entry
    width = shape["intermediate_size"]
    if sr.decision is not None:
        keep_n = sr.decision.get(j, width)
    else:
        keep_n = sr.counts["kept"].get(j, width)  # protected layers are not in the plan's kept widths
    entry = {"layer": j, "width_before": width}
    if keep_n < width:
        order = torch.argsort(scores, descending=True, stable=True)
        keep = torch.sort(order[:keep_n]).values
        w_old = mod.weight.detach().clone()
        prune_channels(ctx.model, adapter, j, keep.tolist())
        if c.reconstruct == "least_squares":
            entry.update(_repair_layer(ctx, sr, j, layer, w_old, keep, stats, dense, pruned_input))
        entry["kept_channels"] = keep.tolist()
    entry["width_after"] = layer_shape(layer, adapter, hd)["intermediate_size"]
    return entry


# --- sweeps ----------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    ctx: RunContext  # ctx.model is the shell
    weights: SafetensorsFolder
    dtype: torch.dtype
    source_index: list[int]  # shell layer j -> layer index in the source files
    # source layer -> layer-drop correction E (out, in) float32 of its down projection (residual_correction)
    drop_corrections: dict[int, torch.Tensor] = field(default_factory=dict)
    max_live_layers: int = 0
    drop_errors: dict[int, dict] = field(default_factory=dict)  # source layer -> residual_correction errors
    pristine: list | None = None  # meta copies of the shell's layers as in the source (a sweep prunes the shell's)

    def reset(self) -> None:
        """Remember the shell's layer shapes now; every later ``load`` starts from them."""
        self.pristine = [copy.deepcopy(layer) for layer in decoder_layers(self.ctx.model, self.ctx.adapter)]

    def load(self, j: int):
        if self.pristine is not None:
            decoder_layers(self.ctx.model, self.ctx.adapter)[j] = copy.deepcopy(self.pristine[j])
        layer = materialize_layer(self.ctx.model, self.ctx.adapter, j, self.weights, self.source_index[j], self.dtype)
        self.max_live_layers = max(self.max_live_layers, live_layers(self.ctx.model, self.ctx.adapter))
        src = self.source_index[j]
        if src in self.drop_corrections:  # the kept layer before a dropped run also writes what the run added
            down = get_module(layer, self.ctx.adapter.layer.down)
            with torch.no_grad():  # as repair_residual adds it (in float64), so in-memory runs match
                down.weight.copy_(down.weight.double() + self.drop_corrections[src].double())
        return layer


def stage_runs(recipe, cfgs: list, offset: int, shell, adapter) -> list[StageRun]:
    """The pruning stages as the sweeps run them, each with its plan's counts: the stages' plans chained on the
    shell's layer shapes (after any layer drop), as gqaprune.plan.simulate chains them."""
    shapes = model_shapes(shell, adapter)
    runs = []
    for k, cfg in enumerate(cfgs):
        planned = STAGES[cfg.type](cfg).plan(shapes, PlanInput(f"stages[{offset + k}] {cfg.type}", shell.config, adapter))
        sequential = repair_mode(recipe.calibration, cfg.reconstruct) == "sequential"
        runs.append(StageRun(cfg, sequential=sequential, counts=planned.counts))
        shapes = planned.shapes
    return runs


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sweep(pipe: Pipeline, stages: list[StageRun], streams: list[Stream], score_stage: int | None,
          writer=None, probe: Stream | None = None, desc: str = "layer-wise") -> None:
    """Visit every layer: stages < score_stage are applied, stage score_stage only records its scores
    (a scoring sweep); with score_stage None every stage is applied and the layer is written."""
    ctx = pipe.ctx
    n = len(decoder_layers(ctx.model, ctx.adapter))
    last = len(stages) if score_stage is None else score_stage
    for j in tqdm(range(n), desc=desc, disable=not ctx.progress, leave=False):
        layer = pipe.load(j)
        for k in range(last + (score_stage is not None)):
            sr = stages[k]
            t0, params_before = time.perf_counter(), _numel(layer)
            stats, out, dense = layer_stats(ctx, sr, j, layer, streams[k])
            scores = layer_scores(ctx, sr, j, stats)
            if k == score_stage:
                sr.scores[j] = scores
                # the typical token's ||h||^2 at the layer's input, as gqaprune.scoring.hidden.layer_input_sq_norms
                per_token = torch.cat([h.double().pow(2).sum(-1).reshape(-1) for h in streams[k].hidden])  # (tokens,)
                sr.sq_norms[j] = float(per_token.median())
            else:
                entry = prune_layer(ctx, sr, j, layer, scores, stats, dense, streams[k + 1])
                if score_stage is None:
                    sr.layers.append(entry)
                    sr.layer_params[0] += params_before
                    sr.layer_params[1] += _numel(layer)
                    sr.seconds += time.perf_counter() - t0
            streams[k].hidden = out
        if score_stage is None:
            streams[last].hidden = run_layer(layer, streams[last])
            layer.to(writer.dtype)  # what is saved is what the probe (the round trip's reference) runs through
            if probe is not None:
                probe.hidden = run_layer(layer, probe)
            prefix = f"{ctx.adapter.model.layers}.{j}."
            writer.write({prefix + name: t.to(writer.dtype) for name, t in layer.state_dict().items()})
        release_layer(ctx.model, ctx.adapter, j)


def decide_global(ctx, sr: StageRun) -> None:
    """The global allocation of stage ``sr`` from the scores of its scoring sweep."""
    c = sr.cfg
    adapter = ctx.adapter
    n = len(decoder_layers(ctx.model, adapter))
    sq = torch.tensor([sr.sq_norms[i] for i in range(n)], dtype=torch.float64)  # what a whole-model pass measures
    if sr.heads:
        sr.decision = HeadPrune(c).per_layer_removals(ctx, sr.scores, sr.counts["protected"], sr.counts["removed"],
                                                      n, input_sq_norms=sq)
    else:
        widths = [s["intermediate_size"] for s in model_shapes(ctx.model, adapter)]  # meta layers: shapes only
        sr.decision, _ = NeuronPrune(c).global_widths(ctx, sr.scores, sr.counts["want"], widths, input_sq_norms=sq)
    sr.scores = {}


# --- layer drop -----------------------------------------------------------------------------------


def drop_decision(pipe: Pipeline, cfg, start: Stream) -> dict:
    """Hidden-state sweep over the source layers: layer scores, dropped layers; then the repair statistics."""
    ctx = pipe.ctx
    drop = LayerDrop(cfg)
    n_layers = len(decoder_layers(ctx.model, ctx.adapter))
    counts = drop.plan(model_shapes(ctx.model, ctx.adapter), PlanInput("stages[0] layer_drop")).counts
    n = counts["drop"]
    gap = 1 if cfg.score == "block_influence" else n
    cos = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    window = [_unit(start.hidden)]  # unit-normalised hidden states of the last gap+1 layer boundaries
    stream = start.copy()
    for j in tqdm(range(n_layers), desc="layer scores (layer-wise)", disable=not ctx.progress, leave=False):
        layer = pipe.load(j)
        stream.hidden = run_layer(layer, stream)
        release_layer(ctx.model, ctx.adapter, j)
        window.append(_unit(stream.hidden))
        if len(window) > gap + 1:
            window.pop(0)
        if len(window) == gap + 1:
            count = sum(u.shape[0] for u in window[0])
            cos[j + 1 - gap, j + 1] = sum(float(torch.einsum("th,th->", a, b)) for a, b in zip(window[0], window[-1]))
            cos[j + 1 - gap, j + 1] /= count
    scores, dropped = drop.choose(cos, n_layers, n, *counts["candidates"])
    repairs = []
    reconstruct, note = layer_drop_reconstruct(cfg, ctx.adapter)
    if reconstruct == "least_squares":
        runs = contiguous_runs(dropped)
        pipe.drop_corrections, pipe.drop_errors = residual_sweep(pipe, runs, start, cfg.reconstruct_damp)
        for s, e in runs:
            repairs.append({"dropped": list(range(s, e)), "repaired_layer": s - 1 if s > 0 else None}
                           if s > 0 else {"dropped": list(range(s, e)), "repaired_layer": None,
                                          "why_not": "no kept layer before layer 0"})
    return {"reconstruct": reconstruct, **({"note": note} if note else {}), "repairs": repairs, "score": cfg.score, "layer_scores": scores,
            "dropped_layers": dropped, "num_layers_before": n_layers, "num_layers_after": n_layers - len(dropped)}


def _unit(hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.functional.normalize(h.float().reshape(-1, h.shape[-1]), dim=-1) for h in hidden]


def residual_sweep(pipe: Pipeline, runs: list[tuple[int, int]], start: Stream,
                   damp: float) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
    """For each dropped run (s, e), s >= 1, the layer-drop correction of layer s-1's down projection and its
    errors (gqaprune.ops.reconstruct.residual_correction), keyed by the repaired layer s-1. The statistics
    (X^T X, X^T (h_e - h_s), ||h_e - h_s||^2), X the down projection's inputs in layer s-1, are accumulated
    batch by batch as gqaprune.scoring.hidden.residual_stats does and solved as soon as the run ends: only
    the correction (out, in) float32 is kept, not the run's (in, in) Gram."""
    ctx = pipe.ctx
    runs = [(s, e) for s, e in runs if s > 0]
    if not runs:
        return {}, {}
    xs: dict[int, list] = {}
    h_start: dict[int, list] = {}
    corrections: dict[int, torch.Tensor] = {}
    errors: dict[int, dict] = {}
    stream = start.copy()
    for j in tqdm(range(max(e for _, e in runs)), desc="layer repair stats (layer-wise)", disable=not ctx.progress,
                  leave=False):
        layer = pipe.load(j)
        starts_here = [s for s, _ in runs if s - 1 == j]
        xs_j: list[torch.Tensor] = []
        h = get_module(layer, ctx.adapter.layer.down).register_forward_pre_hook(
            lambda m, args: xs_j.append(args[0].detach().float().reshape(-1, args[0].shape[-1])))
        try:
            stream.hidden = run_layer(layer, stream)
        finally:
            h.remove()
        release_layer(ctx.model, ctx.adapter, j)
        if starts_here:
            xs[j + 1] = xs_j
        for s in starts_here:
            h_start[s] = list(stream.hidden)
        for s, e in runs:
            if e == j + 1:
                c = cross = None
                delta_sq = 0.0
                for x, hs, he in zip(xs.pop(s), h_start.pop(s), stream.hidden):
                    d = (he.float() - hs.float()).reshape(x.shape[0], -1)  # (tokens, hidden): what the run added
                    if c is None:
                        c = torch.zeros(x.shape[1], x.shape[1])
                        cross = torch.zeros(x.shape[1], d.shape[1])
                    c.addmm_(x.T, x)
                    cross.addmm_(x.T, d)
                    delta_sq += float(d.double().pow(2).sum())
                c64 = c.double()  # the solve's float64 matrix, damped and factored in place of this one
                del c
                corrections[s - 1], errors[s - 1] = residual_correction(c64, cross, delta_sq, damp)
                del c64, cross
    return corrections, errors


# --- the whole run --------------------------------------------------------------------------------


def _cast(stream: Stream, dtype: torch.dtype) -> Stream:
    """The stream as a model in ``dtype`` would carry it (hidden states, rotary cos/sin)."""
    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        return tuple(cast(x) for x in v) if isinstance(v, tuple) else v
    return Stream([h.to(dtype) for h in stream.hidden], [{k: cast(v) for k, v in kw.items()} for kw in stream.kwargs])


def _non_layer_shard(shell, adapter, weights: SafetensorsFolder, dtype: torch.dtype,
                     save_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The output's non-layer tensors (a tied lm_head not repeated), read from the source and cast as the run
    casts them (to the run dtype, then to the save dtype); the shell's own hold nothing during the sweeps."""
    layer_prefix = f"{adapter.model.layers}."
    tied = getattr(shell.config, "tie_word_embeddings", False)
    params = {n for n, _ in shell.named_parameters(remove_duplicate=False)}
    out = {}
    for name, buf in shell.state_dict().items():
        if name.startswith(layer_prefix) or (tied and name == f"{adapter.model.lm_head}.weight"):
            continue
        t = weights.read([name])[name] if name in params else buf  # persistent buffers live in the shell
        out[name] = cast_via(t, dtype, save_dtype)
    return out


def final_logits(shell, adapter, stream: Stream) -> torch.Tensor:
    """Logits (N, T, vocab) from the last decoder layer's outputs: final norm, then lm_head."""
    norm, head = get_module(shell, adapter.model.final_norm), get_module(shell, adapter.model.lm_head)
    with torch.no_grad():
        return torch.cat([head(norm(h)).float() for h in stream.hidden])


def prune_layerwise(recipe, model_dir, adapter, calib: torch.Tensor, folder, *, dtype: torch.dtype,
                    save_dtype: torch.dtype, tokenizer=None, probe: torch.Tensor | None = None,
                    progress: bool = True) -> dict:
    """Run the recipe's stages layer by layer from ``model_dir`` and write the pruned model into ``folder``.

    Returns the stage report entries, the output kind, the probe's logits (for the round trip), the number
    of sweeps and the largest number of decoder layers that held weights at once."""
    from gqaprune.io.checkpoint import finalize_config, fix_config_json, stock_class

    t0 = time.perf_counter()
    weights = SafetensorsFolder(model_dir)
    shell = build_shell(model_dir, dtype)
    check_layerwise_model(shell.config)  # validate refuses it first (gqaprune.plan.simulate)
    load_non_layer(shell, adapter, weights, dtype, "embed")
    ctx = RunContext(model=shell, adapter=adapter, tokenizer=tokenizer, recipe=recipe, calib=calib, progress=progress)
    bs = recipe.calibration.batch_size
    start = embed(shell, adapter, id_batches(calib, bs))
    probe_stream = _cast(embed(shell, adapter, id_batches(probe, bs)), save_dtype) if probe is not None else None
    release_non_layer(shell, adapter)  # the sweeps hold decoder layers only; norm and lm_head come back at the end
    n_source = len(decoder_layers(shell, adapter))
    pipe = Pipeline(ctx, weights, dtype, list(range(n_source)))
    reports, cfgs, sweeps = [], list(recipe.stages), 0
    if cfgs and cfgs[0].type == "layer_drop":
        t = time.perf_counter()
        drop = drop_decision(pipe, cfgs[0], start)
        sweeps += 1 + (cfgs[0].reconstruct == "least_squares")
        params = _numel(shell)
        drop_layers(shell, adapter, drop["dropped_layers"])
        drop.update(params_before=params, params_after=_numel(shell), seconds=round(time.perf_counter() - t, 3))
        pipe.source_index = [i for i in range(n_source) if i not in set(drop["dropped_layers"])]
        reports.append({"type": "layer_drop", "index": 0, **drop})
        cfgs = cfgs[1:]
    offset = len(recipe.stages) - len(cfgs)
    pipe.reset()
    runs = stage_runs(recipe, cfgs, offset, shell, adapter)
    for k, sr in enumerate(runs):
        if sr.cfg.allocation == "global":
            sweep(pipe, runs, [start.copy() for _ in range(k + 1)], score_stage=k,
                  desc=f"scores of stage {offset + k} ({sr.cfg.type}, global)")
            decide_global(ctx, sr)
            sweeps += 1

    n_kept = len(decoder_layers(shell, adapter))
    writer = ShardWriter(folder, n_kept + 1, save_dtype)
    writer.write(_non_layer_shard(shell, adapter, weights, dtype, save_dtype))
    sweep(pipe, runs, [start.copy() for _ in range(len(runs) + 1)], None, writer, probe_stream, desc="prune layer-wise")
    sweeps += 1
    writer.finish()
    for rep in reports:  # the layer-drop repair errors were computed when the repaired layers were loaded
        for r in rep.get("repairs", []):
            if r["repaired_layer"] is not None:
                r.update(pipe.drop_errors.get(r["repaired_layer"], {}))
    non_layer = _numel(shell) - sum(_numel(layer) for layer in decoder_layers(shell, adapter))
    for k, sr in enumerate(runs):
        entry = {"type": sr.cfg.type, "index": offset + k, "score": sr.cfg.score, "allocation": sr.cfg.allocation,
                 "reconstruct": sr.cfg.reconstruct, "sequential": sr.sequential, "layers": sr.layers,
                 "repair_choices": repair_choices(sr.layers),
                 "params_before": non_layer + sr.layer_params[0], "params_after": non_layer + sr.layer_params[1],
                 "seconds": round(sr.seconds, 3)}
        if sr.heads:
            entry["unit"] = sr.cfg.unit
        else:
            entry["align"] = sr.cfg.align
        if sr.heads:
            entry["removed_per_layer"] = [e["removed"] for e in sr.layers]
        reports.append(entry)

    uniform = finalize_config(shell, adapter)
    stock = stock_class(shell)
    shell.config.architectures = [stock.__name__]
    shell.config.save_pretrained(str(folder))
    fix_config_json(folder, stock, save_dtype, uniform, shell.config.__dict__.get("auto_map"))
    if getattr(shell, "generation_config", None) is not None:
        shell.generation_config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    logits = None
    if probe_stream is not None:  # final norm and lm_head as saved
        load_non_layer(shell, adapter, weights, save_dtype, "head", via=dtype)
        shell.to(save_dtype)
        logits = final_logits(shell, adapter, probe_stream)
        release_non_layer(shell, adapter)
    return {"stages": reports, "uniform": uniform, "probe_logits": logits, "sweeps": sweeps,
            "max_live_layers": pipe.max_live_layers, "seconds": round(time.perf_counter() - t0, 3),
            "shapes_after": [layer_shape(layer, adapter, head_dim_of(shell.config, adapter))
                             for layer in decoder_layers(shell, adapter)]}


def stream_folder(folder, adapter, batches: list[dict], dtype: torch.dtype, progress: bool = False,
                  desc: str = "layer-wise forward"):
    """Run ``batches`` of model inputs through the model saved in ``folder``, reading one decoder layer at a
    time: (the shell, with the final norm and lm_head loaded; the last layer's outputs; the largest number of
    decoder layers that held weights at once). The embeddings are held only while embedding."""
    weights = SafetensorsFolder(folder)
    shell = build_shell(folder, dtype)
    check_layerwise_model(shell.config)
    load_non_layer(shell, adapter, weights, dtype, "embed")
    stream = embed(shell, adapter, batches)
    release_non_layer(shell, adapter)
    most = 0
    for j in tqdm(range(len(decoder_layers(shell, adapter))), desc=desc, disable=not progress, leave=False):
        layer = materialize_layer(shell, adapter, j, weights, j, dtype)
        most = max(most, live_layers(shell, adapter))
        stream.hidden = run_layer(layer, stream)
        release_layer(shell, adapter, j)
    load_non_layer(shell, adapter, weights, dtype, "head")
    return shell, stream, most


def streamed_logits(folder, adapter, ids: torch.Tensor, dtype: torch.dtype, batch_size: int,
                    progress: bool = False) -> tuple[torch.Tensor, int]:
    """Logits of the model saved in ``folder`` for ``ids`` (N, T), one decoder layer in memory at a time;
    also the largest number of layers that held weights at once."""
    shell, stream, most = stream_folder(folder, adapter, id_batches(ids, batch_size), dtype, progress, "round trip")
    return final_logits(shell, adapter, stream), most


def streamed_perplexity(folder, adapter, tokens: torch.Tensor, seq_len: int, stride: int | None, batch_size: int,
                        dtype: torch.dtype, progress: bool = False, desc: str = "perplexity") -> dict:
    """gqaprune.evaluation.perplexity.perplexity of the model in ``folder``, one decoder layer in memory at a
    time (the windows' hidden states are held instead)."""
    from gqaprune.evaluation.perplexity import batch_nll, scoring_windows, window_batch

    windows = scoring_windows(tokens.numel(), seq_len, stride)
    chunks = [window_batch(tokens, windows[b: b + batch_size]) for b in range(0, len(windows), batch_size)]
    shell, stream, _ = stream_folder(folder, adapter, [{"input_ids": i, "attention_mask": m} for i, m, _ in chunks],
                                     dtype, progress, desc)
    total_nll, total_tok = 0.0, 0
    norm, head = get_module(shell, adapter.model.final_norm), get_module(shell, adapter.model.lm_head)
    with torch.no_grad():
        for (ids, _, score), h in zip(chunks, stream.hidden):
            nll, count = batch_nll(head(norm(h)), ids, score)
            total_nll += nll
            total_tok += count
    mean = total_nll / total_tok
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tok}
