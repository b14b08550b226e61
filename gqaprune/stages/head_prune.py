"""head_prune: GQA-aware attention head pruning.

unit: group removes whole GQA groups (a KV head, its query heads, their o columns);
unit: query_head removes the same number of query heads from every group (ratio G -> G').
Scores are per query head (q rows + o columns) and per KV head (k + v rows); a group's
score is the sum of its query heads' scores plus its KV head's, which counts once.
"""

from __future__ import annotations

import copy

import torch

from gqaprune.arch.adapter import decoder_layers, get_module, head_dim_of, layer_shape
from gqaprune.context import RunContext
from gqaprune.ops.reconstruct import obs_block_costs, relative_error, repair, repair_paired
from gqaprune.recipe import HeadPruneStage
from gqaprune.scoring.stats import (ablation_scores, collect_stats, head_magnitude_scores, head_taylor_scores,
                              role_paths)
from gqaprune.ops.sequential import paired_grams
from gqaprune.stages.amounts import heads_removed, protected, spread
from gqaprune.scoring.hidden import layer_distances, layer_input_sq_norms
from gqaprune.ops.surgery import prune_heads


def _head_blocks(n: int, head_dim: int) -> list[torch.Tensor]:
    return [torch.arange(h * head_dim, (h + 1) * head_dim) for h in range(n)]


class HeadPrune:
    def __init__(self, cfg: HeadPruneStage):
        self.cfg = cfg

    # -- scores ------------------------------------------------------------------------------
    def layer_scores(self, ctx: RunContext, stats, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q scores (n_kv, G), group scores (n_kv,)) for one layer; higher = more important."""
        c, model, adapter = self.cfg, ctx.model, ctx.adapter
        layer = decoder_layers(model, adapter)[layer_idx]
        hd = head_dim_of(model.config, adapter)
        shape = layer_shape(layer, adapter, hd)
        nq, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
        o_path = role_paths(adapter, layer_idx, ["o"])["o"]
        if c.score == "taylor":
            q, kv = head_taylor_scores(stats.taylor, model, adapter, layer_idx)
        elif c.score == "taylor2":
            q, kv = head_taylor_scores(stats.taylor2, model, adapter, layer_idx)
            if c.taylor_mix:
                q1, kv1 = head_taylor_scores(stats.taylor, model, adapter, layer_idx)
                q, kv = q + c.taylor_mix * q1, kv + c.taylor_mix * kv1
        elif c.score == "magnitude":
            q, kv = head_magnitude_scores(model, adapter, layer_idx)
        elif c.score == "activation":
            o_w = get_module(layer, adapter.layer.o).weight.detach().float()
            col_norm = o_w.pow(2).sum(0).reshape(nq, hd).sum(1).sqrt()
            q = stats.head_norm[o_path] / stats.tokens * col_norm
            kv = torch.zeros(nkv)
        elif c.score == "reconstruction":
            w = get_module(layer, adapter.layer.o).weight
            gram = stats.gram[o_path]
            if c.unit == "group":
                g = nq // nkv
                blocks = [torch.arange(j * g * hd, (j + 1) * g * hd) for j in range(nkv)]
                kv = obs_block_costs(w, gram, blocks, c.reconstruct_damp)
                q = torch.zeros(nq)
            else:
                q = obs_block_costs(w, gram, _head_blocks(nq, hd), c.reconstruct_damp)
                kv = torch.zeros(nkv)
        elif c.score == "ablation":  # measured loss increase of each unit removed alone
            if c.unit == "group":
                kv, q = stats.ablation[o_path], torch.zeros(nq)
            else:
                q, kv = stats.ablation[o_path], torch.zeros(nkv)
        elif c.score == "random":
            gen = ctx.generator(1000 + layer_idx)
            q, kv = torch.rand(nq, generator=gen), torch.rand(nkv, generator=gen)
        elif c.score == "truncate":  # keep the first heads: later heads score lower
            q, kv = -torch.arange(nq, dtype=torch.float), -torch.arange(nkv, dtype=torch.float) * nq
        else:  # pragma: no cover - the schema forbids it
            raise ValueError(c.score)
        q = q.float().reshape(nkv, nq // nkv)
        return q, q.sum(1) + kv.float()

    # -- allocation --------------------------------------------------------------------------
    def per_layer_removals(self, ctx: RunContext, scores: dict[int, tuple], prot: set[int], n_remove: int,
                           n_layers: int) -> dict[int, int]:
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
            # by the RMS norm of the layer's residual input (its square for reconstruction, a squared error),
            # so early layers are not taken for cheap (16Q/4KV Llama G50: raw 372.45, divided 160.96).
            if c.score in ("activation", "reconstruction"):
                sq = layer_input_sq_norms(ctx.model, ctx.adapter, ctx.calib, ctx.batch_size)
                power = 1.0 if c.score == "reconstruction" else 0.5
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
        layers = decoder_layers(model, adapter)
        n_layers = len(layers)
        hd = head_dim_of(model.config, adapter)
        shapes = [layer_shape(l, adapter, hd) for l in layers]
        prot = protected(c.protect_layers, n_layers, "head_prune")
        n_remove = heads_removed(c, shapes[0]["num_attention_heads"], shapes[0]["num_key_value_heads"])

        o_paths = [role_paths(adapter, i, ["o"])["o"] for i in range(n_layers)]
        sequential = ctx.recipe.calibration.sequential and c.reconstruct == "least_squares"
        want_gram = (c.reconstruct == "least_squares" and not sequential) or c.score == "reconstruction"
        taylor_paths = []
        if c.score in ("taylor", "taylor2"):
            for i in range(n_layers):
                taylor_paths += list(role_paths(adapter, i, ["q", "k", "v", "qkv", "o"]).values())
        stats = collect_stats(
            model, ctx.calib, taylor_paths=taylor_paths, taylor2=c.score == "taylor2",
            input_paths=o_paths if (want_gram or c.score == "activation") else [], gram=want_gram,
            head_dim=hd, batch_size=ctx.batch_size, progress=ctx.progress, desc=f"head scores ({c.score})",
        )
        if c.score == "ablation":
            units = {}
            for i in range(n_layers):
                nq, nkv = shapes[i]["num_attention_heads"], shapes[i]["num_key_value_heads"]
                size = nq // nkv * hd if c.unit == "group" else hd  # a group's o_proj columns, or a head's
                units[o_paths[i]] = [torch.arange(u * size, (u + 1) * size) for u in range(nq * hd // size)]
            stats.ablation = ablation_scores(model, ctx.calib, units, ctx.batch_size, ctx.progress,
                                             desc=f"head scores (ablation, {sum(map(len, units.values()))} units)")
        scores = {i: self.layer_scores(ctx, stats, i) for i in range(n_layers)}
        dense = copy.deepcopy(model).eval() if sequential else None  # targets: the model before this stage
        removals = self.per_layer_removals(ctx, scores, prot, n_remove, n_layers)

        per_layer = []
        for i in range(n_layers):
            q, grp = scores[i]
            nkv, g = q.shape
            r = removals[i]
            if c.unit == "group":
                order = sorted(range(nkv), key=lambda j: (float(grp[j]), j))
                removed_kv = sorted(order[:r])
                keep = {j: [j * g + h for h in range(g)] for j in range(nkv) if j not in removed_kv}
            else:
                keep = {}
                for j in range(nkv):
                    order = sorted(range(g), key=lambda h: (float(q[j, h]), h))
                    keep[j] = sorted(j * g + h for h in order[r:])
                removed_kv = []
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
                    new_w, err = repair_paired(w_old, *grams, c.reconstruct_damp)
                    err["rel_error_slice_dense_inputs"] = slice_err
                    with torch.no_grad():
                        get_module(layers[i], adapter.layer.o).weight.copy_(new_w)
                    entry.update(err)
                elif c.reconstruct == "least_squares":
                    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept_q])
                    new_w, err = repair(w_old, stats.gram[o_paths[i]], cols, c.reconstruct_damp)
                    with torch.no_grad():
                        get_module(layers[i], adapter.layer.o).weight.copy_(new_w)
                    entry.update(err)
            after = layer_shape(layers[i], adapter, hd)
            entry.update(heads_after=after["num_attention_heads"], kv_heads_after=after["num_key_value_heads"])
            per_layer.append(entry)
        return {
            "unit": c.unit, "score": c.score, "allocation": c.allocation, "reconstruct": c.reconstruct,
            "removed_per_layer": [removals[i] for i in range(n_layers)],
            "sequential": sequential,
            "scoring_seconds": round(stats.seconds, 3), "scoring_peak_rss_mb": round(stats.peak_rss_mb, 1),
            "layers": per_layer,
        }
