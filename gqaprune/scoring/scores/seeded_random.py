"""random: seeded uniform scores (a baseline); the same recipe seed picks the same units."""

from __future__ import annotations

import torch

from gqaprune.scoring.base import LayerInput, Score


class HeadRandom(Score):
    name, axis = "random", "heads"
    needs = frozenset()

    def compute(self, u: LayerInput):
        gen = u.generator(1000 + u.index)
        return torch.rand(u.n_q, generator=gen), torch.rand(u.n_kv, generator=gen)


class ChannelRandom(Score):
    name, axis = "random", "channels"
    needs = frozenset()

    def compute(self, u: LayerInput):
        return torch.rand(u.width, generator=u.generator(2000 + u.index))
