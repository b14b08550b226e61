"""What a score is: one small object that declares the statistics it reads and computes one layer's scores.

A head score returns (q (n_q,), kv (n_kv,)): per query head and per KV head (a group's score is its query
heads' sum plus its KV head's). A channel score returns (width,). Higher = more important. The scores are
listed in gqaprune.scoring.registry; stages ask for them by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from gqaprune.scoring.stats import Stats

# statistics a score can read (gqaprune.scoring.gather turns them into one calibration pass)
STATISTICS = frozenset({"taylor", "taylor2", "input_sq", "head_norm", "fire", "gram", "ablation"})
GRADIENT_STATISTICS = frozenset({"taylor", "taylor2"})  # need a backward pass of the whole model's loss
# how a score compares across layers (global allocation): raw; divided by the RMS norm of the layer's
# residual input (a unit's output size in the residual stream); divided by its square (a squared error)
CROSS_LAYER = ("raw", "residual_rms", "residual_mean_square")


@dataclass
class LayerInput:
    """One decoder layer and what a score may read about it."""

    model: nn.Module
    adapter: object  # gqaprune.arch.adapter.Adapter
    index: int  # the layer's index in the model
    layer: nn.Module
    stats: Stats
    n_q: int
    n_kv: int
    head_dim: int
    width: int  # MLP intermediate size
    unit: str = "group"  # head scores: group | query_head (ablation and reconstruction score that unit)
    damp: float = 0.01  # reconstruction: damping of the OBS inverse
    taylor_mix: float | None = None  # taylor2: + taylor_mix * taylor
    generator: Callable[[int], torch.Generator] | None = None  # random: seeded generator for a salt


class Score:
    name: ClassVar[str]
    axis: ClassVar[str]  # "heads" or "channels"
    needs: ClassVar[frozenset]  # subset of STATISTICS
    needs_gradients: ClassVar[bool] = False
    layer_local: ClassVar[bool] = True  # computable from one layer's inputs (layer-wise execution)
    cross_layer: ClassVar[str] = "raw"

    def compute(self, u: LayerInput):
        raise NotImplementedError
