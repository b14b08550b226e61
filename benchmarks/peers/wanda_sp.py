"""Wanda-sp (the structured Wanda baseline of An et al., AAAI 2024), re-implemented for the benchmark.

Score of input channel j of an output projection: mean over output rows of |W[o, j]| * ||x_j||, with ||x_j||
the RMS of the channel over the calibration tokens; a head (here: a GQA group, see flap.py) sums its channels.
The same ratio in every layer (uniform), no bias compensation, no repair. Unlike the paper's code, the
statistics come from one pass of the dense model rather than layer by layer through the pruned layers before.
"""

from __future__ import annotations

import torch

from benchmarks.peers.input_stats import projection_input_stats
from gqaprune.arch.adapter import Adapter
from gqaprune.ops.surgery import prune_channels, prune_heads


def wanda_sp_prune(model, adapter: Adapter, calib: torch.Tensor, groups_removed: int, channels_removed: int,
                   batch_size: int = 8) -> None:
    """Remove ``groups_removed`` GQA groups and ``channels_removed`` MLP channels from every layer, in place."""
    cfg = model.config
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    stats = projection_input_stats(model, calib, batch_size)
    for i, layer in enumerate(model.model.layers):
        if groups_removed:
            o = layer.self_attn.o_proj.weight.detach().float()  # (hidden, n_q * hd)
            n_kv = layer.self_attn.k_proj.out_features // hd
            g = o.shape[1] // hd // n_kv
            score = (o.abs() * stats[i, "o"]["msq"].sqrt()).mean(0).reshape(n_kv, -1).sum(1)  # (n_kv,)
            kept = sorted(torch.argsort(score, descending=True)[: n_kv - groups_removed].tolist())
            prune_heads(model, adapter, i, {j: [j * g + h for h in range(g)] for j in kept})
        if channels_removed:
            down = layer.mlp.down_proj.weight.detach().float()
            score = (down.abs() * stats[i, "down"]["msq"].sqrt()).mean(0)  # (intermediate,)
            keep = sorted(torch.argsort(score, descending=True)[: down.shape[1] - channels_removed].tolist())
            prune_channels(model, adapter, i, keep)
