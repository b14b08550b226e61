"""FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024),
re-implemented from the paper for the benchmark (a baseline, not a gqaprune feature).

1. Fluctuation metric: for input channel j of an output projection (o_proj, down_proj),
   S_j = Var(x_j) * ||W[:, j]||^2, the variance of the channel over calibration tokens times the squared
   norm of the weight column it feeds (the official code squares the attention metric once more; so here).
2. Adaptive structure: each layer's attention and MLP metrics are standardized (minus the mean, over the
   standard deviation, within the layer and module); a head takes the mean of its channels; heads and MLP
   channels of all layers are ranked together and the lowest are removed until the parameter budget is met
   (the paper's AL-AM: different widths per layer and per module).
3. Bias compensation: the removed channels' mean contribution W[:, removed] @ E[x_removed] becomes the bias
   of the output projection, so the layer's output keeps its mean.

GQA: FLAP removes whole heads (q, k, v rows and o columns); with grouped KV heads its unit is the whole group
(a KV head with its query heads), as in the GQA port of the official code. Unlike FLAP, at least one group
per layer stays (gqaprune's surgery cannot remove a whole attention block); MLP widths are not aligned.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.peers.input_stats import projection_input_stats
from gqaprune.arch.adapter import Adapter
from gqaprune.ops.surgery import prune_channels, prune_heads


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def flap_scores(model, stats) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(group scores {layer: (n_kv,)}, channel scores {layer: (intermediate,)}), standardized per layer."""
    cfg = model.config
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    groups, channels = {}, {}
    for i, layer in enumerate(model.model.layers):
        o = layer.self_attn.o_proj.weight.detach().float()  # (hidden, n_q * hd)
        n_kv = layer.self_attn.k_proj.out_features // hd
        attn = (stats[i, "o"]["var"] * o.pow(2).sum(0)) ** 2  # (n_q * hd,)
        groups[i] = _standardize(attn).reshape(n_kv, -1).mean(1)  # a group's query heads' channels
        down = layer.mlp.down_proj.weight.detach().float()  # (hidden, intermediate)
        channels[i] = _standardize(stats[i, "down"]["var"] * down.pow(2).sum(0))
    return groups, channels


def flap_prune(model, adapter: Adapter, calib: torch.Tensor, remove_params: int, batch_size: int = 8) -> dict:
    """Remove about ``remove_params`` parameters (attention groups and MLP channels) in place."""
    cfg = model.config
    hidden = cfg.hidden_size
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else hidden // cfg.num_attention_heads
    stats = projection_input_stats(model, calib, batch_size)
    groups, channels = flap_scores(model, stats)
    layers = model.model.layers
    n_kv = layers[0].self_attn.k_proj.out_features // hd
    g = layers[0].self_attn.q_proj.out_features // hd // n_kv
    group_cost = (2 * g + 2) * hd * hidden  # q rows, o columns, k and v rows
    channel_cost = 3 * hidden  # gate and up rows, down column
    units = [(float(s), "group", i, j) for i, sc in groups.items() for j, s in enumerate(sc)]
    units += [(float(s), "channel", i, j) for i, sc in channels.items() for j, s in enumerate(sc)]
    units.sort()
    drop_g = {i: [] for i in groups}
    drop_c = {i: [] for i in channels}
    removed = 0
    for _, kind, i, j in units:
        if removed >= remove_params:
            break
        if kind == "group":
            if len(drop_g[i]) + 1 >= n_kv:  # keep one group per layer
                continue
            drop_g[i].append(j)
            removed += group_cost
        else:
            if len(drop_c[i]) + 1 >= channels[i].numel():
                continue
            drop_c[i].append(j)
            removed += channel_cost
    for i, layer in enumerate(layers):
        _compress(model, adapter, i, drop_g[i], drop_c[i], stats, g, hd)
    return {"groups_removed": [len(drop_g[i]) for i in groups], "channels_removed": [len(drop_c[i]) for i in channels]}


def _set_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    linear.bias = nn.Parameter(bias.to(linear.weight.dtype), requires_grad=False)


def _compress(model, adapter, i, drop_groups, drop_channels, stats, g, hd) -> None:
    layer = model.model.layers[i]
    if drop_groups:
        o = layer.self_attn.o_proj.weight.detach().float()
        cols = torch.cat([torch.arange(j * g * hd, (j + 1) * g * hd) for j in drop_groups])
        bias = o[:, cols] @ stats[i, "o"]["mean"][cols]  # the removed heads' mean output
        n_kv = o.shape[1] // (g * hd)
        keep = {j: [j * g + h for h in range(g)] for j in range(n_kv) if j not in drop_groups}
        prune_heads(model, adapter, i, keep)
        _set_bias(layer.self_attn.o_proj, bias)
    if drop_channels:
        down = layer.mlp.down_proj.weight.detach().float()
        idx = torch.tensor(sorted(drop_channels))
        bias = down[:, idx] @ stats[i, "down"]["mean"][idx]
        keep = sorted(set(range(down.shape[1])) - set(drop_channels))
        prune_channels(model, adapter, i, keep)
        _set_bias(layer.mlp.down_proj, bias)
