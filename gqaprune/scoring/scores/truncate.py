"""truncate: keep the first heads (later heads and groups score lower); a baseline with no data."""

from __future__ import annotations

import torch

from gqaprune.scoring.base import LayerInput, Score


class HeadTruncate(Score):
    name, axis = "truncate", "heads"
    needs = frozenset()

    def compute(self, u: LayerInput):
        return -torch.arange(u.n_q, dtype=torch.float), -torch.arange(u.n_kv, dtype=torch.float) * u.n_q
