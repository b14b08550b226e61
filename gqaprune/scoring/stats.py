"""Importance statistics gathered over calibration batches.

One pass (`collect_stats`) runs the calibration windows through the model and,
as asked, accumulates:
- first- and second-order Taylor terms |w*g| and (w*g)^2/2, reduced to row and
  column sums of every watched Linear as each gradient arrives (the gradient is
  then freed, so no extra copy of the weights' gradients is ever held);
- per-channel input statistics of the consuming projections (o for heads, down
  for MLP channels): sum of squares, mean per-head norm, firing counts;
- Gram matrices C = X^T X of those inputs (for least squares), in float32: each batch adds
  its X^T X in place (``addmm_``), so a pass holds one matrix per watched projection and no
  per-batch copy. The solves widen one matrix at a time to float64 (gqaprune.ops.reconstruct).
  (float64 accumulation of all 22 down_proj Grams of a TinyLlama-1.1B would hold 5.6 GB.)
Scores of heads, groups and channels are read off these sums by gqaprune.scoring.scores.
`collect_stats` is `attach_hooks` + `run_batches` over the whole model; `collect_layer_stats` gathers the
forward-only statistics of one decoder layer from its cached inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from gqaprune.arch.adapter import Adapter


@dataclass
class LinearSums:
    rows: torch.Tensor  # (out,) sum over input columns (+ bias term)
    cols: torch.Tensor  # (in,)


@dataclass
class Stats:
    taylor: dict[str, LinearSums] = field(default_factory=dict)  # param-owner path -> sums of |w*g|
    taylor2: dict[str, LinearSums] = field(default_factory=dict)  # sums of (w*g)^2 / 2
    sq: dict[str, torch.Tensor] = field(default_factory=dict)  # input path -> (in,) sum of x^2 over tokens
    head_norm: dict[str, torch.Tensor] = field(default_factory=dict)  # o path -> (heads,) sum over tokens of ||x_h||
    fire: dict[str, torch.Tensor] = field(default_factory=dict)  # input path -> (in,) count |x| > threshold
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # input path -> (in, in) float32
    ablation: dict[str, torch.Tensor] = field(default_factory=dict)  # o path -> (units,) loss increase
    # input path -> [(tokens, in)] the inputs of the held-out calibration tokens (attach_hooks' hold_from), which
    # a one-shot repair scores its candidates on (gqaprune.ops.reconstruct.repair_held_out); also in ``gram``
    held: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # input path -> tokens its hook has seen (held-out split)
    tokens: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def role_paths(adapter: Adapter, layer_idx: int, roles: list[str]) -> dict[str, str]:
    """role -> full module path for the roles this adapter has."""
    out = {}
    for role in roles:
        p = getattr(adapter.layer, role)
        if p is not None:
            out[role] = f"{adapter.model.layers}.{layer_idx}.{p}"
    return out


def attach_hooks(root: nn.Module, stats: Stats, *, taylor_paths: list[str] = (), taylor2: bool = False,
                 input_paths: list[str] = (), head_norm_paths: list[str] = (), head_dim: int | None = None,
                 gram: bool = False, fire_threshold: float | None = None,
                 gram_dtype: torch.dtype = torch.float32, prefix: str = "", hold_from: int | None = None) -> list:
    """Hooks on the modules under ``root`` (paths relative to it) that add into ``stats``; returns the handles.
    Input statistics are keyed ``prefix + path`` (a layer's hooks can then use the model's paths).
    With ``gram`` and ``hold_from``, the inputs of every token from the ``hold_from``-th on (in the order the
    batches arrive: windows in order, each window's tokens in order) are also kept in ``stats.held``.

    Taylor terms need a backward pass through ``root``; the input statistics need only forward passes."""
    handles = []

    def grad_hook_for(path: str, is_bias: bool):
        def hook(p: torch.Tensor):
            prod = (p.detach() * p.grad).float()  # w * dL/dw
            p.grad = None  # reduce as it arrives; never keep the gradient
            terms = [(stats.taylor, prod.abs())]
            if taylor2:
                terms.append((stats.taylor2, prod.pow(2) / 2))
            for store, val in terms:
                if is_bias:  # a bias entry belongs to its output row
                    store[path].rows += val
                else:
                    store[path].rows += val.sum(1)
                    store[path].cols += val.sum(0)
        return hook

    for path in taylor_paths:
        lin = root.get_submodule(path)
        out_f, in_f = lin.weight.shape
        for store in (stats.taylor, stats.taylor2) if taylor2 else (stats.taylor,):
            store[path] = LinearSums(torch.zeros(out_f), torch.zeros(in_f))
        lin.weight.requires_grad_(True)
        handles.append(lin.weight.register_post_accumulate_grad_hook(grad_hook_for(path, False)))
        if getattr(lin, "bias", None) is not None:  # (an nn.Embedding has no bias)
            lin.bias.requires_grad_(True)
            handles.append(lin.bias.register_post_accumulate_grad_hook(grad_hook_for(path, True)))

    head_paths = set(head_norm_paths)
    assert not head_paths or head_dim is not None, "per-head norms need head_dim"

    def input_hook_for(rel_path: str):
        path = prefix + rel_path

        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            stats.sq[path] = stats.sq.get(path, 0) + x.pow(2).sum(0)
            if rel_path in head_paths:
                per_head = x.reshape(x.shape[0], -1, head_dim).norm(dim=-1)  # (tokens, heads)
                stats.head_norm[path] = stats.head_norm.get(path, 0) + per_head.sum(0)
            if fire_threshold is not None:
                stats.fire[path] = stats.fire.get(path, 0) + (x.abs() > fire_threshold).sum(0).float()
            if gram:  # updated in place: one (in, in) matrix per path and no per-batch temporaries
                g = stats.gram.get(path)
                if g is None:
                    g = stats.gram[path] = torch.zeros(x.shape[1], x.shape[1], dtype=gram_dtype, device=x.device)
                xg = x.to(gram_dtype)
                g.addmm_(xg.T, xg)
                if hold_from is not None:
                    seen = stats.seen.get(path, 0)
                    stats.seen[path] = seen + x.shape[0]
                    first = max(0, hold_from - seen)  # the batch's first held-out row
                    if first < x.shape[0]:
                        stats.held.setdefault(path, []).append(xg[first:].clone())
        return hook

    for path in input_paths:
        handles.append(root.get_submodule(path).register_forward_pre_hook(input_hook_for(path)))
    return handles


def run_batches(model: nn.Module, batches: torch.Tensor, stats: Stats, need_grad: bool, batch_size: int,
                progress: bool, desc: str) -> None:
    """The calibration windows (N, T) through the model (and the LM loss backward when ``need_grad``)."""
    device = next(model.parameters()).device
    for b in tqdm(range(0, batches.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = batches[b: b + batch_size].to(device)  # (B, T)
        with torch.set_grad_enabled(need_grad):
            out = model(input_ids=ids, labels=ids if need_grad else None, use_cache=False)
            if need_grad:
                out.loss.backward()
        stats.tokens += ids.numel()


def collect_stats(model: nn.Module, batches: torch.Tensor, *, taylor_paths: list[str] = (), taylor2: bool = False,
                  input_paths: list[str] = (), head_norm_paths: list[str] = (), head_dim: int | None = None,
                  gram: bool = False, fire_threshold: float | None = None, batch_size: int = 8,
                  progress: bool = True, desc: str = "scoring", gram_dtype: torch.dtype = torch.float32,
                  hold_from: int | None = None) -> Stats:
    """One pass over ``batches`` (N, T) collecting what the scores need (paths relative to ``model``)."""
    stats = Stats()
    if not taylor_paths and not input_paths:  # nothing to watch (magnitude, random, ablation without repair)
        stats.peak_rss_mb = _peak_rss_mb()
        return stats
    t0 = time.perf_counter()
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = attach_hooks(model, stats, taylor_paths=taylor_paths, taylor2=taylor2, input_paths=input_paths,
                           head_norm_paths=head_norm_paths, head_dim=head_dim, gram=gram,
                           fire_threshold=fire_threshold, gram_dtype=gram_dtype, hold_from=hold_from)
    was_training = model.training
    model.eval()
    try:
        run_batches(model, batches, stats, bool(taylor_paths), batch_size, progress, desc)
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.train(was_training)
    stats.seconds = time.perf_counter() - t0
    stats.peak_rss_mb = _peak_rss_mb()
    return stats


def collect_layer_stats(layer: nn.Module, cached_inputs: list[tuple[tuple, dict]], *, input_paths: list[str] = (),
                        head_norm_paths: list[str] = (), head_dim: int | None = None, gram: bool = False,
                        fire_threshold: float | None = None, gram_dtype: torch.dtype = torch.float32,
                        prefix: str = "") -> Stats:
    """The forward-only statistics of one decoder layer from its cached calls: ``cached_inputs`` holds the
    (args, kwargs) the layer was called with, one per batch (paths relative to ``layer``, keyed ``prefix + path``;
    with prefix "model.layers.3." the layer-local scores read them as from collect_stats). For layer-wise
    execution: the layer-local scores need nothing else."""
    stats = Stats()
    t0 = time.perf_counter()
    handles = attach_hooks(layer, stats, input_paths=input_paths, head_norm_paths=head_norm_paths,
                           head_dim=head_dim, gram=gram, fire_threshold=fire_threshold, gram_dtype=gram_dtype,
                           prefix=prefix)
    try:
        with torch.no_grad():
            for args, kwargs in cached_inputs:
                layer(*args, **kwargs)
                hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
                stats.tokens += hidden.shape[0] * hidden.shape[1]
    finally:
        for h in handles:
            h.remove()
    stats.seconds = time.perf_counter() - t0
    stats.peak_rss_mb = _peak_rss_mb()
    return stats


def calibration_loss(model: nn.Module, batches: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over ``batches`` (N, T), no gradients."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for b in range(0, batches.shape[0], batch_size):
            ids = batches[b: b + batch_size].to(device)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * ids.shape[0]
    return total / batches.shape[0]


def ablation_scores(model: nn.Module, batches: torch.Tensor, inputs_of: dict[str, list[torch.Tensor]],
                    batch_size: int = 8, progress: bool = True, desc: str = "ablation") -> dict[str, torch.Tensor]:
    """Measured importance: the calibration loss increase when each unit is removed alone.

    ``inputs_of`` maps a consuming projection's path (o_proj) to its units, each a tensor of that
    projection's input columns (a query head's head_dim columns, or a group's). Zeroing a unit's
    columns at the projection's input is exactly removing the unit (tests/test_surgery.py), so the
    score is the loss the pruned model would have with that unit alone removed. One calibration pass
    per unit, plus one for the base loss: exact, and as costly as that."""
    model_was_training = model.training
    model.eval()
    base = calibration_loss(model, batches, batch_size)
    total = sum(len(units) for units in inputs_of.values())
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    out: dict[str, torch.Tensor] = {}
    try:
        for path, units in inputs_of.items():
            scores = torch.zeros(len(units))
            for u, cols in enumerate(units):
                def zero_unit(mod, args, cols=cols):
                    x = args[0].clone()
                    x[..., cols.to(x.device)] = 0
                    return (x, *args[1:])
                handle = model.get_submodule(path).register_forward_pre_hook(zero_unit)
                try:
                    scores[u] = calibration_loss(model, batches, batch_size) - base
                finally:
                    handle.remove()
                bar.update(1)
            out[path] = scores
    finally:
        bar.close()
        model.train(model_was_training)
    return out
