"""frequency: the fraction of calibration tokens on which a channel fires (|x_j| at down's input above
frequency_threshold); removes dead channels first."""

from __future__ import annotations

from gqaprune.scoring.base import LayerInput, Score
from gqaprune.scoring.stats import role_paths


class ChannelFrequency(Score):
    name, axis = "frequency", "channels"
    needs = frozenset({"fire"})

    def compute(self, u: LayerInput):
        return u.stats.fire[role_paths(u.adapter, u.index, ["down"])["down"]] / u.stats.tokens
