"""neuron_prune: remove MLP intermediate channels (row j of gate/up or fc1, column j of down/fc2).

Scores: taylor (|w*g| over the channel's gate/up rows and down column), magnitude (L2 norm of
those weights), activation (Wanda-sp: ||x_j|| over calibration tokens at the down input times
||down[:, j]||), frequency (fraction of tokens where |x_j| exceeds frequency_threshold: removes
dead channels), reconstruction (OBS cost of removing the channel with least-squares repair),
random (seeded). Kept widths are multiples of `align`.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, model_validator

from gqaprune.arch.adapter import decoder_layers, get_module, head_dim_of, layer_shape, model_shapes
from gqaprune.context import RunContext
from gqaprune.ops.reconstruct import relative_error, repair_paired
from gqaprune.ops.sequential import paired_grams
from gqaprune.ops.surgery import prune_channels
from gqaprune.schema import HeldOutReconstructs, one_of, repair_mode
from gqaprune.scoring.base import LayerInput
from gqaprune.scoring.gather import gather_stats
from gqaprune.scoring.hidden import layer_input_sq_norms
from gqaprune.scoring.registry import CHANNEL_SCORES
from gqaprune.scoring.stats import role_paths
from gqaprune.stages.amounts import aligned_keep, protected
from gqaprune.stages.base import PlanInput, Planned, Stage
from gqaprune.stages.output_norms import check_output_norms
from gqaprune.stages.repair import hold_from, one_shot_repair, repair_choices


class NeuronPruneStage(HeldOutReconstructs):
    type: Literal["neuron_prune"]
    prune_ratio: float | None = Field(None, gt=0, lt=1)
    keep: int | None = Field(None, ge=1)
    score: Literal[tuple(CHANNEL_SCORES)] = "taylor"
    align: int = Field(64, ge=1, description="kept width is a multiple of this")
    allocation: Literal["uniform", "global"] = "uniform"
    protect_layers: list[int] = []
    frequency_threshold: float = Field(1e-3, ge=0, description="|activation| above this counts as firing (score: frequency)")

    @model_validator(mode="after")
    def _amount(self):
        one_of(self, ["prune_ratio", "keep"], "neuron_prune")
        return self


class NeuronPrune(Stage):
    name = "neuron_prune"
    Config = NeuronPruneStage

    def plan(self, shapes: list[dict], inp: PlanInput) -> Planned:
        """Kept width of every unprotected layer (aligned; uniform allocation) and the wanted widths before
        alignment (global allocation shares their sum across layers)."""
        c, where = self.cfg, inp.where
        prot = protected(c.protect_layers, len(shapes), where)
        kept, want, notes, after = {}, {}, [], []
        for i, s in enumerate(shapes):
            if i in prot:
                after.append(dict(s, source_layer=i))
                continue
            kept[i], want[i] = aligned_keep(s["intermediate_size"], c, where)
            if kept[i] != want[i]:
                notes.append(f"layer {i}: keeps {kept[i]} channels instead of {want[i]} to align to {c.align}")
            after.append(dict(s, source_layer=i, intermediate_size=kept[i]))
        if c.allocation != "uniform":
            notes.append("allocation global: per-layer widths are chosen at run time; shown as uniform")
        return Planned(after, notes, {"kept": kept, "want": want})

    def gives_per_layer_shapes(self) -> bool:
        return self.cfg.allocation != "uniform" or bool(self.cfg.protect_layers)

    def layer_local(self) -> bool:
        return CHANNEL_SCORES[self.cfg.score].layer_local and self.cfg.allocation == "uniform"

    def layer_scores(self, ctx: RunContext, stats, i: int, width: int) -> torch.Tensor:
        c = self.cfg
        layer = decoder_layers(ctx.model, ctx.adapter)[i]
        hd = head_dim_of(ctx.model.config, ctx.adapter)
        shape = layer_shape(layer, ctx.adapter, hd)
        u = LayerInput(ctx.model, ctx.adapter, i, layer, stats, shape["num_attention_heads"],
                       shape["num_key_value_heads"], hd, width, damp=c.reconstruct_damp, generator=ctx.generator)
        return CHANNEL_SCORES[c.score].compute(u)

    def global_widths(self, ctx: RunContext, scores: dict[int, torch.Tensor], want: dict[int, int], widths: list[int],
                      input_sq_norms: torch.Tensor | None = None) -> tuple[dict[int, int], dict[int, int]]:
        """Global allocation: (kept width, rounded-down-by) per unprotected layer. ``input_sq_norms`` (L,): the
        layers' mean squared residual-input norms when the caller has them (the layer-wise pipeline); otherwise
        measured here with a pass of ctx.model."""
        cross = CHANNEL_SCORES[self.cfg.score].cross_layer
        if cross != "raw":
            # output written into the residual stream, whose scale grows with depth: measured against the
            # typical token's residual norm, as head_prune does (with raw scores, activation + least squares
            # at 25% of SmolLM2-135M's parameters: global 146.91, uniform 98.63)
            sq = input_sq_norms if input_sq_norms is not None else \
                layer_input_sq_norms(ctx.model, ctx.adapter, ctx.calib, ctx.batch_size)
            power = 1.0 if cross == "residual_mean_square" else 0.5
            scores = {i: s / float(sq[i]) ** power for i, s in scores.items()}
        return global_keep(self.cfg.align, want, widths, scores)

    def apply(self, ctx: RunContext) -> dict:
        c, model, adapter = self.cfg, ctx.model, ctx.adapter
        check_output_norms(c, adapter, "neuron_prune")
        layers = decoder_layers(model, adapter)
        n_layers = len(layers)
        hd = head_dim_of(model.config, adapter)
        widths = [layer_shape(l, adapter, hd)["intermediate_size"] for l in layers]
        planned = self.plan(model_shapes(model, adapter), PlanInput("neuron_prune")).counts
        cand = sorted(planned["kept"])  # the unprotected layers

        down_paths = [role_paths(adapter, i, ["down"])["down"] for i in range(n_layers)]
        mode = repair_mode(ctx.recipe.calibration, c.reconstruct)
        needs = CHANNEL_SCORES[c.score].needs | ({"gram"} if mode == "one_shot" else set())
        stats = gather_stats(needs, model, adapter, ctx.calib, axis="channels", fire_threshold=c.frequency_threshold,
                             batch_size=ctx.batch_size, progress=ctx.progress, desc=f"channel scores ({c.score})",
                             hold_from=hold_from(c, ctx.calib, mode))
        scores = {i: self.layer_scores(ctx, stats, i, widths[i]).float() for i in range(n_layers)}
        sequential = mode == "sequential"
        dense = copy.deepcopy(model).eval() if sequential else None  # targets: the model before this stage

        keep_n: dict[int, int] = {}
        rounding = {}
        if c.allocation == "uniform":
            for i in cand:
                keep_n[i] = planned["kept"][i]
                rounding[i] = planned["want"][i] - keep_n[i]
        else:
            keep_n, rounding = self.global_widths(ctx, scores, planned["want"], widths)

        per_layer = []
        for i in range(n_layers):
            entry = {"layer": i, "width_before": widths[i]}
            if i in keep_n and keep_n[i] < widths[i]:
                order = torch.argsort(scores[i], descending=True, stable=True)
                keep = torch.sort(order[: keep_n[i]]).values
                down = get_module(layers[i], adapter.layer.down)
                w_old = down.weight.detach().clone()
                prune_channels(model, adapter, i, keep.tolist())
                if sequential:
                    grams = paired_grams(dense, model, adapter, i, adapter.layer.down, ctx.calib, ctx.batch_size)
                    new_w, err = repair_paired(w_old, *grams, c.reconstruct_damp, keep=keep)
                    err["rel_error_slice_dense_inputs"] = relative_error(w_old.cpu(), grams[0], keep, w_old.cpu()[:, keep])
                    with torch.no_grad():
                        get_module(layers[i], adapter.layer.down).weight.copy_(new_w)
                    entry.update(err)
                elif mode == "one_shot":
                    new_w, err = one_shot_repair(c, w_old, stats, down_paths[i], keep)
                    with torch.no_grad():
                        get_module(layers[i], adapter.layer.down).weight.copy_(new_w)
                    entry.update(err)
                entry["alignment_rounded_down_by"] = int(rounding[i])
            entry["width_after"] = layer_shape(layers[i], adapter, hd)["intermediate_size"]
            entry["score_summary"] = {"min": float(scores[i].min()), "median": float(scores[i].median()),
                                      "max": float(scores[i].max())}
            per_layer.append(entry)
        return {
            "score": c.score, "allocation": c.allocation, "reconstruct": c.reconstruct, "align": c.align,
            "sequential": sequential, "repair_choices": repair_choices(per_layer),
            "scoring_seconds": round(stats.seconds, 3), "scoring_peak_rss_mb": round(stats.peak_rss_mb, 1),
            "layers": per_layer,
        }


    @classmethod
    def card_what(cls, s: dict) -> str:
        return (f"MLP channels by {s['score']} ({s['allocation']}, reconstruct {s['reconstruct']}, align {s['align']}); "
                f"widths after: {[l['width_after'] for l in s['layers']]}")


def global_keep(align: int, want: dict[int, int], widths: list[int],
                scores: dict[int, torch.Tensor]) -> tuple[dict[int, int], dict[int, int]]:
    """Global allocation: rank raw scores across layers (as head_prune does), keep as many channels in all as
    the plan's wanted widths ``want`` (unprotected layer -> width before alignment) sum to, then align each
    layer's kept width. Returns (kept width, rounded-down-by) per unprotected layer. Shared with the layer-wise
    pipeline (gqaprune.execution)."""
    cand = sorted(want)
    normed = sorted(((float(s), i) for i in cand for s in scores[i]), reverse=True)
    counts = {i: 0 for i in cand}
    for _, i in normed[:sum(want.values())]:
        counts[i] += 1
    keep_n, rounding = {}, {}
    for i in cand:
        wanted = max(counts[i], align)
        keep_n[i] = min(max(align, wanted // align * align), widths[i])
        rounding[i] = wanted - keep_n[i]
    return keep_n, rounding
