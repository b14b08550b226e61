"""reconstruction: the OBS cost of removing a unit with the rest of the consuming projection refit by least
squares (gqaprune.scoring.obs). Heads: a group's (unit: group) or a query head's o columns as one block.
A squared output error: across layers (head global allocation) divided by the residual's mean square."""

from __future__ import annotations

import torch

from gqaprune.arch.adapter import get_module
from gqaprune.scoring.base import LayerInput, Score
from gqaprune.scoring.obs import channel_obs_costs, obs_block_costs
from gqaprune.scoring.stats import role_paths


class HeadReconstruction(Score):
    name, axis = "reconstruction", "heads"
    needs = frozenset({"gram"})
    cross_layer = "residual_mean_square"

    def compute(self, u: LayerInput):
        nq, nkv, hd = u.n_q, u.n_kv, u.head_dim
        w = get_module(u.layer, u.adapter.layer.o).weight
        gram = u.stats.gram[role_paths(u.adapter, u.index, ["o"])["o"]]
        if u.unit == "group":
            g = nq // nkv
            blocks = [torch.arange(j * g * hd, (j + 1) * g * hd) for j in range(nkv)]
            return torch.zeros(nq), obs_block_costs(w, gram, blocks, u.damp)
        blocks = [torch.arange(h * hd, (h + 1) * hd) for h in range(nq)]
        return obs_block_costs(w, gram, blocks, u.damp), torch.zeros(nkv)


class ChannelReconstruction(Score):
    name, axis = "reconstruction", "channels"
    cross_layer = "residual_mean_square"  # global neuron_prune: measured against the residual stream (as heads)
    needs = frozenset({"gram"})

    def compute(self, u: LayerInput):
        w = get_module(u.layer, u.adapter.layer.down).weight
        return channel_obs_costs(w, u.stats.gram[role_paths(u.adapter, u.index, ["down"])["down"]], u.damp)
