"""Structural surgery through adapter roles: drop layers, attention heads, MLP channels.

Every function edits the model in place, builds new, smaller nn.Linear modules
(also on the meta device, which `plan` uses) and keeps module attributes and the
config consistent so that HF attention, the KV cache and save/reload keep working.
"""

from __future__ import annotations

import torch
from torch import nn

from gqaprune.arch.adapter import Adapter, decoder_layers, get_module, head_dim_of, layer_shape, set_module
from gqaprune.arch.modeling_perlayer import sync_layer_attributes


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping output ``rows`` and input ``cols`` (index tensors) of ``lin``."""
    w = lin.weight  # (out, in)
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w) if w.device.type != "meta" else None
        if lin.bias is not None:
            b = lin.bias if rows is None else lin.bias.index_select(0, rows.to(w.device))
            new.bias.copy_(b) if w.device.type != "meta" else None
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def _head_rows(heads: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    """Row indices of ``heads`` in a projection whose rows are heads of ``head_dim`` (after ``offset``)."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    idx = torch.tensor(heads, dtype=torch.long)
    return (offset + idx[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def prune_heads(model: nn.Module, adapter: Adapter, layer_idx: int, keep: dict[int, list[int]]) -> None:
    """Keep, in one layer, KV heads ``keep.keys()`` and for each the query heads ``keep[kv]``.

    Query head h belongs to KV head h // G (G = heads per group). Every kept KV head must keep
    the same number of query heads, so the layer stays a valid GQA layer with ratio G'.
    """
    layer = decoder_layers(model, adapter)[layer_idx]
    r = adapter.layer
    hd = head_dim_of(model.config, adapter)
    shape = layer_shape(layer, adapter, hd)
    n_q, n_kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    group = n_q // n_kv
    kv_keep = sorted(keep)
    assert kv_keep and all(0 <= j < n_kv for j in kv_keep), f"bad KV heads {kv_keep} (layer has {n_kv})"
    per_group = {len(keep[j]) for j in kv_keep}
    assert len(per_group) == 1 and min(per_group) >= 1, "every kept group must keep the same number of query heads"
    q_keep = []
    for j in kv_keep:
        qs = sorted(keep[j])
        assert all(h // group == j for h in qs), f"query heads {qs} are not all in group {j} (G={group})"
        q_keep.extend(qs)

    q_rows, kv_rows = _head_rows(q_keep, hd), _head_rows(kv_keep, hd)
    if r.fused_qkv:
        qkv = get_module(layer, r.qkv)
        rows = torch.cat([q_rows, _head_rows(kv_keep, hd, n_q * hd), _head_rows(kv_keep, hd, (n_q + n_kv) * hd)])
        set_module(layer, r.qkv, slice_linear(qkv, rows=rows))
    else:
        set_module(layer, r.q, slice_linear(get_module(layer, r.q), rows=q_rows))
        set_module(layer, r.k, slice_linear(get_module(layer, r.k), rows=kv_rows))
        set_module(layer, r.v, slice_linear(get_module(layer, r.v), rows=kv_rows))
    set_module(layer, r.o, slice_linear(get_module(layer, r.o), cols=q_rows))
    new_shape = dict(shape, num_attention_heads=len(q_keep), num_key_value_heads=len(kv_keep))
    sync_layer_attributes(layer, r.model_dump(), new_shape, model.config)


def prune_channels(model: nn.Module, adapter: Adapter, layer_idx: int, keep: list[int]) -> None:
    """Keep MLP intermediate channels ``keep`` (sorted) in one layer."""
    layer = decoder_layers(model, adapter)[layer_idx]
    r = adapter.layer
    hd = head_dim_of(model.config, adapter)
    shape = layer_shape(layer, adapter, hd)
    width = shape["intermediate_size"]
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    assert idx.numel() >= 1 and int(idx.max()) < width
    if r.fused_gate_up:
        set_module(layer, r.gate_up, slice_linear(get_module(layer, r.gate_up), rows=torch.cat([idx, idx + width])))
    else:
        if r.gate is not None:
            set_module(layer, r.gate, slice_linear(get_module(layer, r.gate), rows=idx))
        set_module(layer, r.up, slice_linear(get_module(layer, r.up), rows=idx))
    set_module(layer, r.down, slice_linear(get_module(layer, r.down), cols=idx))
    sync_layer_attributes(layer, r.model_dump(), dict(shape, intermediate_size=int(idx.numel())), model.config)


def drop_layers(model: nn.Module, adapter: Adapter, drop: list[int]) -> None:
    """Remove decoder layers ``drop``; renumber layer_idx (KV cache slots) and per-layer config keys."""
    layers = decoder_layers(model, adapter)
    n = len(layers)
    kept = [i for i in range(n) if i not in set(drop)]
    assert kept, "cannot drop every layer"
    new = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    set_module(model, adapter.model.layers, new)
    cfg = model.config
    setattr(cfg, adapter.config.num_layers, len(kept))
    for key in adapter.config.per_layer_lists + ["gqaprune_layers"]:
        val = getattr(cfg, key, None)
        if isinstance(val, list) and len(val) == n:
            setattr(cfg, key, [val[i] for i in kept])
    for key in adapter.config.layer_count_keys:
        val = getattr(cfg, key, None)
        if isinstance(val, int):
            setattr(cfg, key, sum(1 for i in kept if i < val))
