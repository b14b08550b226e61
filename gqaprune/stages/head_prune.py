"""head_prune: GQA-aware attention head pruning.

unit: group removes whole GQA groups (a KV head, its query heads, their o columns);
unit: query_head removes the same number of query heads from every group (ratio G -> G').
Scores are per query head (q rows + o columns) and per KV head (k + v rows); a group's
score is the sum of its query heads' scores plus its KV head's, which counts once.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, model_validator

from gqaprune.arch.adapter import decoder_layers, get_module, head_dim_of, layer_shape, model_shapes
from gqaprune.context import RunContext
from gqaprune.errors import InputError
from gqaprune.ops.reconstruct import relative_error, repair_paired
from gqaprune.ops.sequential import paired_grams
from gqaprune.ops.surgery import prune_heads
from gqaprune.schema import HeldOutReconstructs, one_of, repair_mode
from gqaprune.scoring.base import LayerInput
from gqaprune.scoring.gather import gather_stats
from gqaprune.scoring.hidden import layer_distances, layer_input_sq_norms
from gqaprune.scoring.registry import HEAD_SCORES
from gqaprune.scoring.stats import role_paths
from gqaprune.stages.amounts import heads_removed, protected, spread
from gqaprune.stages.base import PlanInput, Planned, Stage
from gqaprune.stages.output_norms import check_output_norms
from gqaprune.stages.repair import hold_from, one_shot_repair, repair_choices


class HeadPruneStage(HeldOutReconstructs):
    type: Literal["head_prune"]
    unit: Literal["group", "query_head"] = "group"
    prune_ratio: float | None = Field(None, gt=0, lt=1)
    keep_kv_heads: int | None = Field(None, ge=1)
    keep_q_per_kv: int | None = Field(None, ge=1)
    round: Literal["exact", "nearest"] = "exact"  # exact: a ratio that cannot be met is an error
    score: Literal[tuple(HEAD_SCORES)] = "taylor"
    taylor_mix: float | None = Field(None, ge=0, description="taylor2 + taylor_mix * taylor")
    allocation: Literal["uniform", "global", "by_layer_importance"] = "uniform"
    min_groups_per_layer: int = Field(1, ge=1)
    protect_layers: list[int] = []

    @model_validator(mode="after")
    def _amount(self):
        one_of(self, ["prune_ratio", "keep_kv_heads", "keep_q_per_kv"], "head_prune")
        if self.unit == "group" and self.keep_q_per_kv is not None:
            raise ValueError("keep_q_per_kv goes with unit: query_head (unit: group takes prune_ratio or keep_kv_heads)")
        if self.unit == "query_head" and self.keep_kv_heads is not None:
            raise ValueError("keep_kv_heads goes with unit: group (unit: query_head takes prune_ratio or keep_q_per_kv)")
        if self.taylor_mix is not None and self.score != "taylor2":
            raise ValueError("taylor_mix goes with score: taylor2")
        return self


def choose_heads(unit: str, q: torch.Tensor, grp: torch.Tensor, r: int) -> tuple[dict[int, list[int]], list[int]]:
    """The ``r`` lowest-scoring groups (unit group) or query heads per group (query_head) of one layer removed:
    (kept KV head -> kept query heads, removed KV heads). q: (n_kv, G) head scores, grp: (n_kv,).
    Shared with the layer-wise pipeline (gqaprune.execution)."""
    nkv, g = q.shape
    if unit == "group":
        order = sorted(range(nkv), key=lambda j: (float(grp[j]), j))
        removed_kv = sorted(order[:r])
        return {j: [j * g + h for h in range(g)] for j in range(nkv) if j not in removed_kv}, removed_kv
    keep = {}
    for j in range(nkv):
        order = sorted(range(g), key=lambda h: (float(q[j, h]), h))
        keep[j] = sorted(j * g + h for h in order[r:])
    return keep, []


class HeadPrune(Stage):
    name = "head_prune"
    Config = HeadPruneStage

    # -- plan: the counts ----------------------------------------------------------------------
    def plan(self, shapes: list[dict], inp: PlanInput) -> Planned:
        """Units removed per layer (groups, or query heads per group) and the protected layers."""
        c, where, n_layers = self.cfg, inp.where, len(shapes)
        uniq = {(s["num_attention_heads"], s["num_key_value_heads"]) for s in shapes}
        if len(uniq) != 1:
            raise InputError(f"{where}: layers have different head counts {sorted(uniq)}; prune a model with "
                             "uniform attention shapes (per-layer head pruning of a per-layer model is not supported)")
        n_q, n_kv = uniq.pop()
        r = heads_removed(c, n_q, n_kv, where)
        prot = protected(c.protect_layers, n_layers, where)
        after = []
        for i, s in enumerate(shapes):
            kv_after, q_after = (n_kv - r, n_q - r * n_q // n_kv) if c.unit == "group" else (n_kv, n_q - r * n_kv)
            after.append(dict(s, source_layer=i) if i in prot else
                         dict(s, source_layer=i, num_attention_heads=q_after, num_key_value_heads=kv_after))
        notes = []
        if c.allocation != "uniform":
            notes.append(f"allocation {c.allocation}: per-layer head counts are chosen at run time; "
                         "shown here as the uniform equivalent")
        return Planned(after, notes, {"removed": r, "protected": prot})

    def gives_per_layer_shapes(self) -> bool:
        return self.cfg.allocation != "uniform" or bool(self.cfg.protect_layers)

    def layer_local(self) -> bool:
        return HEAD_SCORES[self.cfg.score].layer_local and self.cfg.allocation == "uniform"

    # -- scores ------------------------------------------------------------------------------
    def layer_scores(self, ctx: RunContext, stats, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q scores (n_kv, G), group scores (n_kv,)) for one layer; higher = more important."""
        c, model, adapter = self.cfg, ctx.model, ctx.adapter
        layer = decoder_layers(model, adapter)[layer_idx]
        hd = head_dim_of(model.config, adapter)
        shape = layer_shape(layer, adapter, hd)
        nq, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
        u = LayerInput(model, adapter, layer_idx, layer, stats, nq, nkv, hd, shape["intermediate_size"],
                       unit=c.unit, damp=c.reconstruct_damp, taylor_mix=c.taylor_mix, generator=ctx.generator)
        q, kv = HEAD_SCORES[c.score].compute(u)
        q = q.float().reshape(nkv, nq // nkv)
        return q, q.sum(1) + kv.float()

    # -- allocation --------------------------------------------------------------------------
    def per_layer_removals(self, ctx: RunContext, scores: dict[int, tuple], prot: set[int], n_remove: int,
                           n_layers: int, input_sq_norms: torch.Tensor | None = None) -> dict[int, int]:
        """Removals per layer. ``input_sq_norms`` (L,): the layers' mean squared residual-input norms when the
        caller has them (the layer-wise pipeline); otherwise measured here with a pass of ctx.model."""
        c = self.cfg
        cand = [i for i in range(n_layers) if i not in prot]
        if c.unit == "group":
            cap = {i: scores[i][1].numel() - c.min_groups_per_layer for i in cand}
        else:
            cap = {i: scores[i][0].shape[1] - 1 for i in cand}
        total = n_remove * len(cand)
        if c.allocation == "uniform":
            return {i: (n_remove if i in cand else 0) for i in range(n_layers)}
        if c.allocation == "global":
            # each layer offers its removal steps in order of cost, and the cheapest steps of the whole
            # model are taken. Taylor and ablation scores are loss changes and magnitude weight norms: raw,
            # not normalized per layer (dividing by a layer's mean hid which layers matter: tiny-llama Q25 no
            # repair, per-layer mean 295.34, raw 157.69, uniform 191.78). Activation and reconstruction
            # measure a unit's output in the residual stream, whose scale grows with depth: they are divided
            # by the RMS norm of the layer's residual input (its square for reconstruction, a squared error;
            # the score's cross_layer says which), so early layers are not taken for cheap
            # (16Q/4KV Llama G50: raw 372.45, divided 160.96). The norm is the typical token's (median), not
            # the mean, which massive activations on sink tokens inflate 500x in SmolLM2's layers 12-28.
            cross = HEAD_SCORES[c.score].cross_layer
            if cross != "raw":
                sq = input_sq_norms if input_sq_norms is not None else \
                    layer_input_sq_norms(ctx.model, ctx.adapter, ctx.calib, ctx.batch_size)
                power = 1.0 if cross == "residual_mean_square" else 0.5
                scores = {i: (q / float(sq[i]) ** power, grp / float(sq[i]) ** power) for i, (q, grp) in scores.items()}
            steps = []
            for i in cand:
                q, grp = scores[i]
                if c.unit == "group":
                    costs = torch.sort(grp).values
                else:
                    costs = torch.sort(q, dim=1).values.sum(0)  # k-th step: each group's k-th cheapest head
                steps += [(float(costs[k]), i, k) for k in range(cap[i])]
            steps.sort()
            alloc = {i: 0 for i in range(n_layers)}
            for _, i, _ in steps[:total]:
                alloc[i] += 1
            return alloc
        # by_layer_importance: more pruning where a layer matters less (block influence)
        cos = layer_distances(ctx.model, ctx.adapter, ctx.calib, ctx.batch_size, ctx.progress)
        bi = {i: max(1.0 - float(cos[i, i + 1]), 1e-6) for i in cand}
        alloc = spread(total, {i: 1.0 / bi[i] for i in cand}, cap)
        return {i: alloc.get(i, 0) for i in range(n_layers)}

    # -- apply -------------------------------------------------------------------------------
    def apply(self, ctx: RunContext) -> dict:
        c, model, adapter = self.cfg, ctx.model, ctx.adapter
        check_output_norms(c, adapter, "head_prune")
        layers = decoder_layers(model, adapter)
        n_layers = len(layers)
        hd = head_dim_of(model.config, adapter)
        counts = self.plan(model_shapes(model, adapter), PlanInput("head_prune")).counts
        prot, n_remove = counts["protected"], counts["removed"]

        o_paths = [role_paths(adapter, i, ["o"])["o"] for i in range(n_layers)]
        mode = repair_mode(ctx.recipe.calibration, c.reconstruct)
        score = HEAD_SCORES[c.score]
        needs = score.needs | ({"gram"} if mode == "one_shot" else set())  # one-shot repair solves from C
        stats = gather_stats(needs, model, adapter, ctx.calib, axis="heads", unit=c.unit, batch_size=ctx.batch_size,
                             progress=ctx.progress, desc=f"head scores ({c.score})",
                             hold_from=hold_from(c, ctx.calib, mode))
        scores = {i: self.layer_scores(ctx, stats, i) for i in range(n_layers)}
        sequential = mode == "sequential"
        dense = copy.deepcopy(model).eval() if sequential else None  # targets: the model before this stage
        removals = self.per_layer_removals(ctx, scores, prot, n_remove, n_layers)

        per_layer = []
        for i in range(n_layers):
            q, grp = scores[i]
            nkv, g = q.shape
            r = removals[i]
            keep, removed_kv = choose_heads(c.unit, q, grp, r)
            kept_q = sorted(h for qs in keep.values() for h in qs)
            entry = {
                "layer": i,
                "group_scores": [float(x) for x in grp],
                "head_scores": [float(x) for x in q.reshape(-1)],
                "removed_kv_heads": removed_kv,
                "removed_q_heads": sorted(set(range(nkv * g)) - set(kept_q)),
                "heads_before": nkv * g, "kv_heads_before": nkv,
            }
            if r > 0:
                o_mod = get_module(layers[i], adapter.layer.o)
                w_old = o_mod.weight.detach().clone()
                prune_heads(model, adapter, i, keep)
                if sequential:
                    grams = paired_grams(dense, model, adapter, i, adapter.layer.o, ctx.calib, ctx.batch_size)
                    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept_q])
                    slice_err = relative_error(w_old.cpu(), grams[0], cols, w_old.cpu()[:, cols])
                    new_w, err = repair_paired(w_old, *grams, c.reconstruct_damp, keep=cols)
                    err["rel_error_slice_dense_inputs"] = slice_err
                    with torch.no_grad():
                        get_module(layers[i], adapter.layer.o).weight.copy_(new_w)
                    entry.update(err)
                elif mode == "one_shot":
                    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept_q])
                    new_w, err = one_shot_repair(c, w_old, stats, o_paths[i], cols)
                    with torch.no_grad():
                        get_module(layers[i], adapter.layer.o).weight.copy_(new_w)
                    entry.update(err)
            after = layer_shape(layers[i], adapter, hd)
            entry.update(heads_after=after["num_attention_heads"], kv_heads_after=after["num_key_value_heads"])
            per_layer.append(entry)
        return {
            "unit": c.unit, "score": c.score, "allocation": c.allocation, "reconstruct": c.reconstruct,
            "removed_per_layer": [removals[i] for i in range(n_layers)],
            "sequential": sequential, "repair_choices": repair_choices(per_layer),
            "scoring_seconds": round(stats.seconds, 3), "scoring_peak_rss_mb": round(stats.peak_rss_mb, 1),
            "layers": per_layer,
        }

    # -- what the output folder shows --------------------------------------------------------
    @classmethod
    def card_what(cls, s: dict) -> str:
        return (f"{s['unit']} pruning by {s['score']} ({s['allocation']}, reconstruct {s['reconstruct']}); "
                f"heads per layer after: {[l['heads_after'] for l in s['layers']]}, "
                f"KV heads: {[l['kv_heads_after'] for l in s['layers']]}")

    @classmethod
    def plot(cls, s: dict, plt):
        import numpy as np

        key = "group_scores" if s["unit"] == "group" else "head_scores"
        rows = [l[key] for l in s["layers"]]
        width = max(len(r) for r in rows)
        mat = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            mat[i, : len(r)] = r
        fig, ax = plt.subplots(figsize=(6, min(0.3 * len(rows), 12) + 1.5))
        im = ax.imshow(mat, aspect="auto", cmap="viridis")
        removed_key = "removed_kv_heads" if s["unit"] == "group" else "removed_q_heads"
        for i, l in enumerate(s["layers"]):
            for j in l[removed_key]:
                ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=12, fontweight="bold")
        from gqaprune.report.plots import integer_ticks

        integer_ticks(ax.xaxis, width)
        integer_ticks(ax.yaxis, len(rows))
        ax.set_xlabel("KV group" if s["unit"] == "group" else "query head")
        ax.set_ylabel("layer")
        ax.set_title(f"stage {s['index']}: {s['score']} importance (x = removed)")
        fig.colorbar(im, ax=ax)
        return fig, f"stage{s['index']}_head_importance.png"
