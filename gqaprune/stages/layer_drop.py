"""layer_drop: remove whole decoder layers by block influence (ShortGPT) or angular distance (Gromov et al.).

block_influence: BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}) (input and output of layer i);
the num_layers lowest-BI layers outside the protected ends are dropped.
angular_block: d(l, n) = mean over tokens of arccos(cos(h_l, h_{l+n})) / pi; the contiguous
run of n layers with the smallest d is dropped (Gromov et al. use the last token; we average
over all tokens of the calibration windows).

reconstruct: least_squares then repairs what was dropped, without training: for each contiguous
run of dropped layers [s, e), the MLP output projection (down_proj, fc2) of the kept layer s-1 is
refit by least squares to write, on top of its own output, the residual-stream update h_e - h_s
that the dropped run used to add (gqaprune.ops.reconstruct.repair_residual). A run that starts at
layer 0 has no layer before it and is not repaired.
"""

from __future__ import annotations

import math

import torch

from gqaprune.arch.adapter import decoder_layers, get_module
from gqaprune.scoring.hidden import layer_distances, residual_stats
from gqaprune.context import RunContext
from gqaprune.ops.reconstruct import repair_residual
from gqaprune.recipe import LayerDropStage
from gqaprune.ops.surgery import drop_layers


def contiguous_runs(dropped: list[int]) -> list[tuple[int, int]]:
    """[2, 3, 6] -> [(2, 4), (6, 7)]: half-open runs of consecutive layer indices."""
    runs: list[list[int]] = []
    for i in sorted(dropped):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(s, e) for s, e in runs]


class LayerDrop:
    def __init__(self, cfg: LayerDropStage):
        self.cfg = cfg

    def count(self, n_layers: int) -> int:
        c = self.cfg
        return c.num_layers if c.num_layers is not None else max(1, round(c.fraction * n_layers))

    def apply(self, ctx: RunContext) -> dict:
        c = self.cfg
        n_layers = len(decoder_layers(ctx.model, ctx.adapter))
        n = self.count(n_layers)
        lo, hi = c.protect_first, n_layers - c.protect_last  # candidates: [lo, hi)
        cos = layer_distances(ctx.model, ctx.adapter, ctx.calib, ctx.batch_size, ctx.progress)
        if c.score == "block_influence":
            scores = [1.0 - float(cos[i, i + 1]) for i in range(n_layers)]
            order = sorted(range(lo, hi), key=lambda i: (scores[i], i))
            dropped = sorted(order[:n])
        else:
            scores = [math.acos(max(-1.0, min(1.0, float(cos[i, i + n])))) / math.pi if i + n <= n_layers else None
                      for i in range(n_layers)]
            starts = [i for i in range(lo, hi - n + 1)]
            best = min(starts, key=lambda i: (scores[i], i))
            dropped = list(range(best, best + n))
        repairs = []
        if c.reconstruct == "least_squares":
            runs = contiguous_runs(dropped)
            stats = residual_stats(ctx.model, ctx.adapter, ctx.calib, runs, ctx.batch_size, ctx.progress)
            layers = decoder_layers(ctx.model, ctx.adapter)
            for s, e in runs:
                if s not in stats:
                    repairs.append({"dropped": list(range(s, e)), "repaired_layer": None,
                                    "why_not": "no kept layer before layer 0"})
                    continue
                down = get_module(layers[s - 1], ctx.adapter.layer.down)
                new_w, err = repair_residual(down.weight, *stats[s], c.reconstruct_damp)
                with torch.no_grad():
                    down.weight.copy_(new_w)
                repairs.append({"dropped": list(range(s, e)), "repaired_layer": s - 1, **err})
        drop_layers(ctx.model, ctx.adapter, dropped)
        return {
            "reconstruct": c.reconstruct,
            "repairs": repairs,
            "score": c.score,
            "layer_scores": scores,
            "dropped_layers": dropped,
            "num_layers_before": n_layers,
            "num_layers_after": n_layers - len(dropped),
        }
