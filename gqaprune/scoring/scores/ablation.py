"""ablation: the measured calibration-loss increase when the unit (a group, or a query head) is removed
alone; one calibration pass of the whole model per unit, so not layer-local."""

from __future__ import annotations

import torch

from gqaprune.scoring.base import LayerInput, Score
from gqaprune.scoring.stats import role_paths


class HeadAblation(Score):
    name, axis = "ablation", "heads"
    needs = frozenset({"ablation"})
    layer_local = False

    def compute(self, u: LayerInput):
        measured = u.stats.ablation[role_paths(u.adapter, u.index, ["o"])["o"]]
        if u.unit == "group":
            return torch.zeros(u.n_q), measured
        return measured, torch.zeros(u.n_kv)
