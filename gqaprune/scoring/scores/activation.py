"""activation (Wanda-sp): a unit's mean input norm at the consuming projection times the norm of the weights
it feeds. Heads: mean ||x_h|| at o's input times ||o[:, h]|| (KV heads score 0: their effect runs through their
query heads). Channels: ||x_j|| over calibration tokens at down's input times ||down[:, j]||.
Across layers (head global allocation) a head's output grows with the residual stream: divided by its RMS."""

from __future__ import annotations

import torch

from gqaprune.arch.adapter import get_module
from gqaprune.scoring.base import LayerInput, Score
from gqaprune.scoring.stats import role_paths


class HeadActivation(Score):
    name, axis = "activation", "heads"
    needs = frozenset({"head_norm"})
    cross_layer = "residual_rms"

    def compute(self, u: LayerInput):
        o_path = role_paths(u.adapter, u.index, ["o"])["o"]
        o_w = get_module(u.layer, u.adapter.layer.o).weight.detach().float()
        col_norm = o_w.pow(2).sum(0).reshape(u.n_q, u.head_dim).sum(1).sqrt()  # (n_q,)
        return u.stats.head_norm[o_path] / u.stats.tokens * col_norm, torch.zeros(u.n_kv)


class ChannelActivation(Score):
    name, axis = "activation", "channels"
    cross_layer = "residual_rms"  # global neuron_prune: measured against the residual stream (as heads)
    needs = frozenset({"input_sq"})

    def compute(self, u: LayerInput):
        down_path = role_paths(u.adapter, u.index, ["down"])["down"]
        col = get_module(u.layer, u.adapter.layer.down).weight.detach().float().norm(dim=0)
        return u.stats.sq[down_path].sqrt() * col
