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
from typing import Literal

import torch
from pydantic import Field, model_validator

from gqaprune.arch.adapter import decoder_layers, get_module, model_shapes
from gqaprune.context import RunContext
from gqaprune.errors import InputError
from gqaprune.ops.reconstruct import repair_residual
from gqaprune.ops.surgery import drop_layers
from gqaprune.schema import Strict, one_of
from gqaprune.scoring.hidden import layer_distances, residual_stats
from gqaprune.stages.base import PlanInput, Planned, Stage
from gqaprune.stages.output_norms import layer_drop_reconstruct


class LayerDropStage(Strict):
    type: Literal["layer_drop"]
    num_layers: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, lt=1)
    score: Literal["block_influence", "angular_block"] = "block_influence"
    protect_first: int = Field(1, ge=0)
    protect_last: int = Field(1, ge=0)
    # not schema.Reconstructs: this repair writes a dropped run's residual update, and never runs sequentially
    reconstruct: Literal["least_squares", "none"] = Field(
        "least_squares", description="least_squares: refit the MLP output projection of the kept layer before each "
        "dropped run so that it also writes what the run added to the residual stream; none: drop only")
    reconstruct_damp: float = Field(0.01, gt=0, description="lambda as a fraction of the mean diagonal of X^T X")

    @model_validator(mode="after")
    def _amount(self):
        one_of(self, ["num_layers", "fraction"], "layer_drop")
        return self


def contiguous_runs(dropped: list[int]) -> list[tuple[int, int]]:
    """[2, 3, 6] -> [(2, 4), (6, 7)]: half-open runs of consecutive layer indices."""
    runs: list[list[int]] = []
    for i in sorted(dropped):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(s, e) for s, e in runs]


class LayerDrop(Stage):
    name = "layer_drop"
    Config = LayerDropStage

    def plan(self, shapes: list[dict], inp: PlanInput) -> Planned:
        """How many layers drop and which are candidates; shown as the last candidates dropping."""
        c, n_layers = self.cfg, len(shapes)
        n = c.num_layers if c.num_layers is not None else max(1, round(c.fraction * n_layers))
        cand = list(range(c.protect_first, n_layers - c.protect_last))
        if n >= n_layers:
            raise InputError(f"{inp.where}: dropping {n} of {n_layers} layers would remove every layer")
        if n > len(cand):
            raise InputError(f"{inp.where}: dropping {n} layers, but only {len(cand)} of {n_layers} are outside "
                             f"protect_first={c.protect_first} / protect_last={c.protect_last}")
        placeholder = set(cand[-n:])
        after = [dict(s, source_layer=i) for i, s in enumerate(shapes) if i not in placeholder]
        return Planned(after, ["which layers drop is decided by the scores at run time"],
                       {"drop": n, "candidates": (cand[0], cand[-1] + 1)})

    def layer_local(self) -> bool:
        return False  # scores compare hidden states across layers

    def choose(self, cos: torch.Tensor, n_layers: int, n: int, lo: int, hi: int) -> tuple[list, list[int]]:
        """(per-layer scores, dropped layers): ``n`` of the candidates [lo, hi) (the plan's counts) from
        D[i, j] = mean cos(h_i, h_j); block_influence reads only D[i, i+1] and angular_block only D[i, i+n]
        (the layer-wise pipeline fills just those)."""
        if self.cfg.score == "block_influence":
            scores = [1.0 - float(cos[i, i + 1]) for i in range(n_layers)]
            order = sorted(range(lo, hi), key=lambda i: (scores[i], i))
            return scores, sorted(order[:n])
        scores = [math.acos(max(-1.0, min(1.0, float(cos[i, i + n])))) / math.pi if i + n <= n_layers else None
                  for i in range(n_layers)]
        best = min(range(lo, hi - n + 1), key=lambda i: (scores[i], i))
        return scores, list(range(best, best + n))

    def apply(self, ctx: RunContext) -> dict:
        c = self.cfg
        n_layers = len(decoder_layers(ctx.model, ctx.adapter))
        counts = self.plan(model_shapes(ctx.model, ctx.adapter), PlanInput("layer_drop")).counts
        n = counts["drop"]
        lo, hi = counts["candidates"]  # candidates: [lo, hi)
        cos = layer_distances(ctx.model, ctx.adapter, ctx.calib, ctx.batch_size, ctx.progress)
        scores, dropped = self.choose(cos, n_layers, n, lo, hi)
        repairs = []
        reconstruct, note = layer_drop_reconstruct(c, ctx.adapter)
        if reconstruct == "least_squares":
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
            "reconstruct": reconstruct,
            **({"note": note} if note else {}),
            "repairs": repairs,
            "score": c.score,
            "layer_scores": scores,
            "dropped_layers": dropped,
            "num_layers_before": n_layers,
            "num_layers_after": n_layers - len(dropped),
        }

    @classmethod
    def card_what(cls, s: dict) -> str:
        what = f"dropped layers {s['dropped_layers']} by {s['score']}"
        fixed = [r for r in s.get("repairs", []) if r.get("repaired_layer") is not None]
        if fixed:
            what += "; least-squares repair: " + ", ".join(
                f"layer {r['repaired_layer']} writes {1 - r['rel_error_lsq']:.0%} of what layers {r['dropped']} added"
                for r in fixed)
        return what

    @classmethod
    def plot(cls, s: dict, plt):
        scores = [x if x is not None else float("nan") for x in s["layer_scores"]]
        fig, ax = plt.subplots(figsize=(6, 3))
        colors = ["tab:red" if i in s["dropped_layers"] else "tab:blue" for i in range(len(scores))]
        ax.bar(range(len(scores)), scores, color=colors)
        from gqaprune.report.plots import integer_ticks

        integer_ticks(ax.xaxis, len(scores))
        ax.set_xlim(-0.6, len(scores) - 0.4)
        ax.set_xlabel("layer (before this stage)")
        ax.set_ylabel(s["score"])
        ax.set_title(f"stage {s['index']}: layer scores (red = dropped)")
        return fig, f"stage{s['index']}_layer_scores.png"
