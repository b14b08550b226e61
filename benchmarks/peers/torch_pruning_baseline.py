"""Torch-Pruning 1.6.1 baseline (peer method) for the benchmark.

Configured like upstream's ``examples/LLMs/prune_llm.py`` (VainF/Torch-Pruning): ``MetaPruner`` with
local (``global_pruning=False``) ranking, ``num_heads`` for the q/k/v projections, ``prune_num_heads=True``,
``prune_head_dims=False``, ``ignored_layers=[lm_head]``, ``out_channel_groups={gate_up_proj: 2}`` for fused
MLPs, then the example's post-pruning fix-up of module attributes and config.

Differences from the example, all forced or needed to isolate one structure:

* ``GroupNormImportance`` no longer exists in 1.6.1; its successor ``GroupMagnitudeImportance(p=2,
  group_reduction="mean")`` is used ("magnitude"). "taylor" is ``GroupTaylorImportance`` with the LM-loss
  gradients accumulated over all ``calib`` windows.
* Tracing uses ``use_cache=False`` (under transformers 5.x the graph build never finishes with the KV cache,
  upstream issue 527) and eager attention (with sdpa and no mask the attention is not traced as
  multi-head, so the GQA head logic is not triggered).
* Only one structure is pruned per call: attention heads (``tp_prune_attention``) or MLP intermediate
  channels (``tp_prune_mlp``). The example prunes the hidden size too; here the layers of the other
  structure are put in ``ignored_layers``, which also freezes the hidden-size group (it contains
  ``o_proj``/``down_proj`` outputs).
* With GQA, Torch-Pruning removes query heads only (``ceil(ceil(ratio * n_q) / n_kv)`` per KV group, see
  ``tp_query_heads_removed``) and never KV heads, so ``kv_heads_per_layer`` stays unchanged.

What TP 1.6.1 cannot do (``NotImplementedError``; measured on tiny models): heads of a fused ``qkv_proj`` with
GQA (Phi-3: it assumes 3 equal q/k/v blocks and breaks the model; MHA fused works), heads of Phi-style
attention (graph grouping never finishes), and leaving exactly one query head per KV group (it silently prunes
nothing). MLP channel pruning works for all five tiny families (gate/up/down, fused gate_up, fc1/fc2).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

TP_VERSION = "1.6.1"


def available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# model introspection


def tp_query_heads_removed(n_q: int, n_kv: int, head_ratio: float) -> int:
    """Query heads per layer that TP 1.6.1 (local pruning, prune_num_heads) removes at ``head_ratio``.

    Mirrors ``BasePruner._prune``: ``k = ceil(head_ratio * n_q)``; with GQA ``ceil(k / n_kv)`` per KV group,
    so the count is rounded *up* to a multiple of n_kv (8 Q / 2 KV: 0.1 -> 2, 0.3 -> 4)."""
    k = math.ceil(head_ratio * n_q)
    return math.ceil(k / n_kv) * n_kv if n_kv != n_q else k


def _decoder_layers(model) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: no model.layers; not a supported decoder")
    return list(layers)


def _lm_head(model) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise NotImplementedError(f"{type(model).__name__}: no output embeddings")
    return head


def _attn_kind(attn: nn.Module) -> str:
    if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
        return "separate"
    if hasattr(attn, "qkv_proj"):
        return "fused"
    raise NotImplementedError(f"{type(attn).__name__}: unknown attention projection layout")


def _out_proj(attn: nn.Module) -> nn.Linear:
    for n in ("o_proj", "dense", "out_proj"):
        if hasattr(attn, n):
            return getattr(attn, n)
    raise NotImplementedError(f"{type(attn).__name__}: no output projection found")


def _mlp_linears(mlp: nn.Module) -> list[nn.Linear]:
    names = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2")
    found = [getattr(mlp, n) for n in names if isinstance(getattr(mlp, n, None), nn.Linear)]
    if not found:
        raise NotImplementedError(f"{type(mlp).__name__}: unknown MLP layout")
    return found


def _mlp_in_out(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, bool]:
    """(first up-projection, down-projection, fused gate_up?)"""
    if hasattr(mlp, "gate_proj"):
        return mlp.gate_proj, mlp.down_proj, False
    if hasattr(mlp, "gate_up_proj"):
        return mlp.gate_up_proj, mlp.down_proj, True
    if hasattr(mlp, "fc1"):
        return mlp.fc1, mlp.fc2, False
    raise NotImplementedError(f"{type(mlp).__name__}: unknown MLP layout")


def _head_dim(model, attn) -> int:
    hd = getattr(attn, "head_dim", None) or getattr(model.config, "head_dim", None)
    return int(hd or model.config.hidden_size // model.config.num_attention_heads)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# helpers shared by both entry points


@contextmanager
def _eager_no_cache(model):
    """Eager attention and no KV cache while tracing / scoring; restored afterwards."""
    cfg = model.config
    old_impl = getattr(cfg, "_attn_implementation", None)
    old_cache = getattr(cfg, "use_cache", None)
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    try:
        yield
    finally:
        if old_impl is not None:
            cfg._attn_implementation = old_impl
        if old_cache is not None:
            cfg.use_cache = old_cache


def _forward_fn(m, x):
    return m(x, use_cache=False)


def _make_importance(importance: str):
    import torch_pruning as tp

    if importance == "magnitude":
        # the example's GroupNormImportance(p=2, group_reduction="mean"), renamed in 1.6.x
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean")
    raise ValueError(f"importance must be 'magnitude' or 'taylor', got {importance!r}")


def _accumulate_lm_grads(model, calib: torch.Tensor, batch_size: int = 8) -> None:
    """Sum of LM-loss gradients over all calib windows into .grad (what GroupTaylorImportance reads)."""
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    model.zero_grad(set_to_none=True)
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        n = calib.shape[0]
        for i in range(0, n, batch_size):
            x = calib[i : i + batch_size]
            out = model(input_ids=x, labels=x, use_cache=False)
            (out.loss * x.shape[0] / n).backward()
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)


def _check_finite(model, calib: torch.Tensor) -> None:
    with torch.no_grad():
        logits = model(calib[:1, : min(calib.shape[1], 32)], use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("Torch-Pruning produced a model with non-finite logits")


def _example_inputs(calib: torch.Tensor) -> torch.Tensor:
    return calib[:1, : min(calib.shape[1], 16)].clone()


def _run_pruner(model, calib, importance, ignored, pruning_ratio, num_heads, out_channel_groups,
                head_pruning_ratio, round_to):
    import warnings

    import torch_pruning as tp

    imp = _make_importance(importance)
    if importance == "taylor":
        _accumulate_lm_grads(model, calib)
    with warnings.catch_warnings():
        # norm weights are unwrapped parameters; TP warns it will prune their last dim (= hidden, frozen here)
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        warnings.filterwarnings("ignore", message=".*last non-singleton dimension.*")
        pruner = _build_pruner(tp, model, calib, imp, ignored, pruning_ratio, num_heads, out_channel_groups,
                               head_pruning_ratio, round_to)
    for g in pruner.step(interactive=True):
        g.prune()
    del pruner
    model.zero_grad(set_to_none=True)


def _build_pruner(tp, model, calib, imp, ignored, pruning_ratio, num_heads, out_channel_groups,
                  head_pruning_ratio, round_to):
    return tp.pruner.MetaPruner(
        model,
        example_inputs=_example_inputs(calib),
        forward_fn=_forward_fn,
        importance=imp,
        global_pruning=False,
        pruning_ratio=pruning_ratio,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,  # as the example: whole heads only, RoPE untouched
        head_pruning_ratio=head_pruning_ratio,
        out_channel_groups=out_channel_groups,
        round_to=round_to,
    )


# ----------------------------------------------------------------------------------------------------------
# attention heads


def _require_tp(ratio: float | None = None, name: str = "") -> None:
    """Torch-Pruning is installed and ``ratio`` (when given) lies in (0, 1)."""
    if not available():
        raise RuntimeError(f"torch-pruning is not installed (pip install torch-pruning=={TP_VERSION})")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"{name} must be in (0, 1)")


def tp_prune_attention(model, calib: torch.Tensor, head_ratio: float, importance: str = "magnitude") -> dict:
    """Remove ``head_ratio`` of the query heads of every layer in place, as Torch-Pruning does it.

    With GQA, TP removes ``ceil(ceil(head_ratio * n_q) / n_kv)`` query heads from each KV group and never a KV
    head. With MHA (n_kv == n_q) every removed head takes its k/v head along (as in the upstream example).
    Returns ``heads_per_layer``, ``kv_heads_per_layer``, ``params``, ``seconds``, ``note``. Raises
    ``NotImplementedError`` where TP 1.6.1 cannot do it (fused qkv_proj with GQA, Phi-style partial rotary)."""
    _require_tp(head_ratio, "head_ratio")
    cfg = model.config
    layers = _decoder_layers(model)
    n_q, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    gqa = n_kv != n_q
    fused = _refuse_what_tp_cannot_prune(layers, n_q, n_kv, head_ratio)

    t0 = time.perf_counter()
    with _eager_no_cache(model):
        num_heads: dict[nn.Module, int] = {}
        ignored: list[nn.Module] = [_lm_head(model)]
        for layer in layers:
            a = layer.self_attn
            if fused:
                num_heads[a.qkv_proj] = n_q  # as the example
            else:
                num_heads[a.q_proj] = n_q
                num_heads[a.k_proj] = n_kv
                num_heads[a.v_proj] = n_kv
            ignored.extend(_mlp_linears(layer.mlp))  # freezes MLP and hidden-size groups
        # pruning_ratio must be > 0 for the attention groups to be visited at all; with prune_head_dims=False
        # it only gates head removal (no head-dim channels are cut); the other groups are ignored.
        _run_pruner(model, calib, importance, ignored, pruning_ratio=head_ratio, num_heads=num_heads,
                    out_channel_groups={}, head_pruning_ratio=head_ratio, round_to=None)

        heads, kv_heads = _fix_attention_modules(model, layers, fused)
        if len(set(heads)) != 1 or len(set(kv_heads)) != 1:
            # Phi-3 reads config.num_attention_heads at forward time; local pruning keeps counts uniform
            raise RuntimeError(f"non-uniform head counts after pruning: {heads} / {kv_heads}")
        cfg.num_attention_heads = heads[0]
        cfg.num_key_value_heads = kv_heads[0]
        if getattr(cfg, "head_dim", None) is None:
            cfg.head_dim = _head_dim(model, layers[0].self_attn)
        _check_finite(model, calib)
    seconds = time.perf_counter() - t0
    removed = n_q - heads[0]
    if removed != tp_query_heads_removed(n_q, n_kv, head_ratio):
        raise RuntimeError(f"Torch-Pruning removed {removed} heads, expected "
                           f"{tp_query_heads_removed(n_q, n_kv, head_ratio)}")
    if gqa:
        how = (f"GQA: query heads only, removed {removed}/{n_q} per layer "
               f"(ceil(ceil({head_ratio}*{n_q})/{n_kv}) per KV group), KV heads kept")
    else:
        how = f"MHA: removed {removed}/{n_q} heads per layer (q, k, v together)"
    note = f"Torch-Pruning {TP_VERSION} MetaPruner ({importance}, local); {how}"
    return {"heads_per_layer": heads, "kv_heads_per_layer": kv_heads, "params": _n_params(model),
            "seconds": seconds, "note": note}


def _refuse_what_tp_cannot_prune(layers, n_q: int, n_kv: int, head_ratio: float) -> bool:
    """Raise where TP 1.6.1 cannot remove ``head_ratio`` of the heads (each case measured, see below);
    else return whether the layers' attention is a fused qkv_proj."""
    gqa = n_kv != n_q
    kinds = {_attn_kind(l.self_attn) for l in layers}
    if len(kinds) != 1:
        raise NotImplementedError("mixed attention layouts")
    fused = kinds == {"fused"}
    if fused and gqa:
        # Measured (tiny Phi-3, 8 Q / 2 KV, head_dim 16, qkv_proj 192 wide): TP 1.6.1 treats a single fused
        # linear as 3 equal q/k/v blocks (head_dim = out_features // (3 * num_heads)); at head_ratio 0.25 it cut
        # 48 rows from qkv_proj (16 of q, 16 of k, 16 of v) but only 16 inputs of o_proj, so q/k/v no longer
        # split into whole heads and the forward pass fails. (MHA fused qkv works: 3 equal blocks is true there.)
        raise NotImplementedError(
            "Torch-Pruning 1.6.1 cannot prune heads of a fused qkv_proj with GQA: it assumes 3 equal q/k/v blocks, "
            "so it removes KV rows too (qkv_proj -48 rows vs o_proj -16 inputs) and the model no longer runs"
        )
    if tp_query_heads_removed(n_q, n_kv, head_ratio) >= n_q:
        raise ValueError(f"head_ratio {head_ratio} makes Torch-Pruning remove all {n_q} query heads")
    if gqa and n_q - tp_query_heads_removed(n_q, n_kv, head_ratio) == n_kv:
        # Measured (8 Q / 2 KV, ratio 0.6 / 0.75): after updating num_heads[q_proj] TP re-tests "is GQA" as
        # "q heads != kv heads"; with one query head left per group that is False, so the KV projections are not
        # exempted, the group fails check_pruning_group and is silently skipped (nothing is pruned).
        raise NotImplementedError(
            f"Torch-Pruning 1.6.1 cannot leave one query head per KV group ({n_q} -> {n_kv}): its GQA check then "
            "fails and it silently prunes nothing"
        )
    if any(hasattr(l.self_attn, "rotary_ndims") for l in layers):
        # Measured (tiny Phi, also with partial_rotary_factor=1.0 and with MHA): building the pruning group of
        # q_proj / k_proj / v_proj never finishes (DependencyGraph.get_pruning_group keeps expanding through the
        # slice + cat of the partial-rotary split), so MetaPruner's constructor hangs.
        raise NotImplementedError(
            "Torch-Pruning 1.6.1 hangs building the q/k/v pruning groups of Phi-style attention (partial-rotary "
            "slice + cat of q/k); head pruning is not possible"
        )
    return fused


def _fix_attention_modules(model, layers, fused: bool) -> tuple[list[int], list[int]]:
    """The example's post-pruning fix-up, per module (HF reads these attributes at forward time): each
    layer's head counts from its pruned projections, checked to split into whole heads. Returns
    (query heads, KV heads) per layer."""
    heads, kv_heads = [], []
    for layer in layers:
        a = layer.self_attn
        hd = _head_dim(model, a)
        o_in = _out_proj(a).in_features
        nh = o_in // hd
        if fused:
            nkv = nh
            ok = nh * hd == o_in and a.qkv_proj.out_features == 3 * nh * hd
        else:
            nkv = a.k_proj.out_features // hd
            ok = (nh * hd == o_in == a.q_proj.out_features and nkv * hd == a.k_proj.out_features
                  == a.v_proj.out_features)
        if not ok:
            raise RuntimeError("Torch-Pruning left projections that do not split into whole heads")
        if nh % nkv:
            raise RuntimeError(f"Torch-Pruning left {nh} query heads for {nkv} KV heads (not a multiple)")
        a.num_key_value_groups = nh // nkv
        for attr, val in (("num_heads", nh), ("num_key_value_heads", nkv), ("hidden_size", nh * hd)):
            setattr(a, attr, val)  # harmless where HF does not read them; Phi-3 reads num_key_value_heads
        heads.append(nh)
        kv_heads.append(nkv)
    return heads, kv_heads


# ----------------------------------------------------------------------------------------------------------
# MLP channels


def tp_prune_mlp(model, calib: torch.Tensor, channel_ratio: float, importance: str = "magnitude",
                 round_to: int | None = None) -> dict:
    """Remove ``channel_ratio`` of the MLP intermediate channels of every layer in place (gate/up/down;
    attention and hidden size untouched). ``round_to`` is passed to MetaPruner (example uses 4; default None
    keeps the exact budget int(I * (1 - ratio)))."""
    _require_tp(channel_ratio, "channel_ratio")
    cfg = model.config
    layers = _decoder_layers(model)
    n_q, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    t0 = time.perf_counter()
    with _eager_no_cache(model):
        ignored: list[nn.Module] = [_lm_head(model)]
        out_channel_groups: dict[nn.Module, int] = {}
        for layer in layers:
            a = layer.self_attn
            ignored.extend(m for m in a.modules() if isinstance(m, nn.Linear))  # freezes attention + hidden
            first, _down, fused = _mlp_in_out(layer.mlp)
            if fused:
                out_channel_groups[first] = 2  # as the example: gate_up_proj = [gate; up]
        _run_pruner(model, calib, importance, ignored, pruning_ratio=channel_ratio, num_heads={},
                    out_channel_groups=out_channel_groups, head_pruning_ratio=0.0, round_to=round_to)

        inter = []
        for layer in layers:
            first, down, fused = _mlp_in_out(layer.mlp)
            i_out = first.out_features // 2 if fused else first.out_features
            if down.in_features != i_out:
                raise RuntimeError("down projection input does not match the pruned intermediate width")
            inter.append(i_out)
        cfg.intermediate_size = max(inter)
        _check_finite(model, calib)
    seconds = time.perf_counter() - t0
    heads = [n_q] * len(layers)
    kv = [n_kv] * len(layers)
    note = f"Torch-Pruning {TP_VERSION} MetaPruner ({importance}); MLP intermediate channels only"
    return {"heads_per_layer": heads, "kv_heads_per_layer": kv, "intermediate_per_layer": inter,
            "params": _n_params(model), "seconds": seconds, "note": note}


# ----------------------------------------------------------------------------------------------------------
# hidden size (residual-stream width)


def tp_prune_hidden(model, calib: torch.Tensor, hidden_ratio: float, importance: str = "magnitude",
                    round_to: int | None = None) -> dict:
    """Remove ``hidden_ratio`` of the hidden size (embedding columns, norms, every projection's stream side)
    in place, as Torch-Pruning's hidden-size group does it. Heads and MLP channels are frozen by putting the
    projections that read the stream (q/k/v, gate/up or fused, fc1) in ``ignored_layers`` with the LM head:
    then the only group left with a root is the residual stream (rooted at o_proj/down_proj outputs)."""
    _require_tp(hidden_ratio, "hidden_ratio")
    cfg = model.config
    layers = _decoder_layers(model)
    head_dim = _head_dim(model, layers[0].self_attn)
    tied = _lm_head(model).weight is model.get_input_embeddings().weight
    t0 = time.perf_counter()
    with _eager_no_cache(model):
        ignored: list[nn.Module] = [_lm_head(model)]
        for layer in layers:
            a = layer.self_attn
            ignored += [m for n, m in a.named_children() if isinstance(m, nn.Linear) and m is not _out_proj(a)]
            first, down, _fused = _mlp_in_out(layer.mlp)
            ignored += [m for m in _mlp_linears(layer.mlp) if m is not down]
        _run_pruner(model, calib, importance, ignored, pruning_ratio=hidden_ratio, num_heads={},
                    out_channel_groups={}, head_pruning_ratio=0.0, round_to=round_to)
        width = model.get_input_embeddings().weight.shape[1]
        for layer in layers:
            if _out_proj(layer.self_attn).out_features != width or _mlp_in_out(layer.mlp)[1].out_features != width:
                raise RuntimeError("Torch-Pruning left output projections that do not match the embedding width")
        for m in model.modules():  # norms keep their normalised shape (nn.LayerNorm reads it in forward)
            if isinstance(getattr(m, "normalized_shape", None), tuple) and m.weight is not None:
                m.normalized_shape = tuple(m.weight.shape)
        if tied:  # TP slices the two (shared) parameters separately, with the same channels: share them again
            head, embed = _lm_head(model), model.get_input_embeddings()
            if not torch.equal(head.weight, embed.weight):
                raise RuntimeError("Torch-Pruning cut different channels from the tied embedding and LM head")
            head.weight = embed.weight
        cfg.head_dim = head_dim
        cfg.hidden_size = width
        _check_finite(model, calib)
    seconds = time.perf_counter() - t0
    import torch_pruning

    note = f"Torch-Pruning {torch_pruning.__version__} MetaPruner ({importance}, local); hidden size only"
    return {"hidden_size": width, "params": _n_params(model), "seconds": seconds, "note": note}


# ----------------------------------------------------------------------------------------------------------
# the example's default mode: heads, MLP and the hidden size together


def tp_prune_default(model, calib: torch.Tensor, ratio: float, importance: str = "magnitude") -> dict:
    """Upstream prune_llm.py as it is: one ``pruning_ratio`` for the hidden size, the MLP channels and (as
    ``head_pruning_ratio``) the query heads, ``round_to=4``, lm_head ignored. Tied input/output embeddings are
    untied first (a copy of the weight for lm_head), because TP slices the embedding's hidden dimension while
    lm_head is ignored; both lose the same hidden channels, so they are tied again afterwards (checked equal)."""
    _require_tp()
    cfg = model.config
    layers = _decoder_layers(model)
    if any(_attn_kind(l.self_attn) != "separate" for l in layers):
        raise NotImplementedError("default mode here supports separate q/k/v projections only")
    head, emb = _lm_head(model), model.get_input_embeddings()
    tied = head.weight is emb.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    t0 = time.perf_counter()
    with _eager_no_cache(model):
        num_heads: dict[nn.Module, int] = {}
        for layer in layers:
            a = layer.self_attn
            num_heads[a.q_proj], num_heads[a.k_proj], num_heads[a.v_proj] = n_q, n_kv, n_kv
        _run_pruner(model, calib, importance, [head], pruning_ratio=ratio, num_heads=num_heads,
                    out_channel_groups={}, head_pruning_ratio=ratio, round_to=4)
        cfg.hidden_size = head.in_features
        if tied:
            if not torch.equal(head.weight, emb.weight):
                raise RuntimeError("Torch-Pruning pruned the embedding and lm_head along different hidden channels")
            head.weight = emb.weight
        heads = set()
        for layer in layers:
            a = layer.self_attn
            hd = _head_dim(model, a)
            nh, nkv = a.q_proj.out_features // hd, a.k_proj.out_features // hd
            a.num_key_value_groups = nh // nkv
            for attr, val in (("num_heads", nh), ("num_key_value_heads", nkv), ("hidden_size", nh * hd)):
                setattr(a, attr, val)
            heads.add((nh, nkv))
            cfg.intermediate_size = layer.mlp.gate_proj.out_features
        if len(heads) != 1:
            raise RuntimeError(f"non-uniform head counts after pruning: {heads}")
        cfg.num_attention_heads, cfg.num_key_value_heads = heads.pop()
        _check_finite(model, calib)
    return {"params": _n_params(model), "seconds": time.perf_counter() - t0, "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "intermediate": cfg.intermediate_size,
            "note": f"Torch-Pruning {TP_VERSION} MetaPruner ({importance}, local), prune_llm.py default mode"}
