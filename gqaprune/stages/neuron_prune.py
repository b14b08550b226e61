"""neuron_prune: remove MLP intermediate channels (row j of gate/up or fc1, column j of down/fc2).

Scores: taylor (|w*g| over the channel's gate/up rows and down column), magnitude (L2 norm of
those weights), activation (Wanda-sp: ||x_j|| over calibration tokens at the down input times
||down[:, j]||), frequency (fraction of tokens where |x_j| exceeds frequency_threshold: removes
dead channels), reconstruction (OBS cost of removing the channel with least-squares repair),
random (seeded). Kept widths are multiples of `align`.
"""

from __future__ import annotations

import copy

import torch

from gqaprune.arch.adapter import decoder_layers, get_module, head_dim_of, layer_shape
from gqaprune.context import RunContext
from gqaprune.ops.reconstruct import relative_error, repair, repair_paired
from gqaprune.recipe import NeuronPruneStage
from gqaprune.scoring.stats import channel_magnitude_scores, channel_taylor_scores, collect_stats, role_paths
from gqaprune.ops.sequential import paired_grams
from gqaprune.stages.amounts import aligned_keep, protected
from gqaprune.ops.surgery import prune_channels


class NeuronPrune:
    def __init__(self, cfg: NeuronPruneStage):
        self.cfg = cfg

    def layer_scores(self, ctx: RunContext, stats, i: int, width: int) -> torch.Tensor:
        c = self.cfg
        down_path = role_paths(ctx.adapter, i, ["down"])["down"]
        layer = decoder_layers(ctx.model, ctx.adapter)[i]
        if c.score == "taylor":
            return channel_taylor_scores(stats.taylor, ctx.adapter, i, width)
        if c.score == "magnitude":
            return channel_magnitude_scores(ctx.model, ctx.adapter, i)
        if c.score == "activation":
            col = get_module(layer, ctx.adapter.layer.down).weight.detach().float().norm(dim=0)
            return stats.sq[down_path].sqrt() * col
        if c.score == "frequency":
            return stats.fire[down_path] / stats.tokens
        if c.score == "reconstruction":
            w = get_module(layer, ctx.adapter.layer.down).weight
            gram = stats.gram[down_path]
            return _channel_obs_costs(w, gram, c.reconstruct_damp)
        if c.score == "random":
            return torch.rand(width, generator=ctx.generator(2000 + i))
        raise ValueError(c.score)  # pragma: no cover

    def apply(self, ctx: RunContext) -> dict:
        c, model, adapter = self.cfg, ctx.model, ctx.adapter
        layers = decoder_layers(model, adapter)
        n_layers = len(layers)
        hd = head_dim_of(model.config, adapter)
        widths = [layer_shape(l, adapter, hd)["intermediate_size"] for l in layers]
        prot = protected(c.protect_layers, n_layers, "neuron_prune")
        cand = [i for i in range(n_layers) if i not in prot]

        down_paths = [role_paths(adapter, i, ["down"])["down"] for i in range(n_layers)]
        sequential = ctx.recipe.calibration.sequential and c.reconstruct == "least_squares"
        want_gram = (c.reconstruct == "least_squares" and not sequential) or c.score == "reconstruction"
        taylor_paths = []
        if c.score == "taylor":
            for i in range(n_layers):
                taylor_paths += list(role_paths(adapter, i, ["gate", "up", "gate_up", "down"]).values())
        needs_inputs = want_gram or c.score in ("activation", "frequency")
        stats = collect_stats(
            model, ctx.calib, taylor_paths=taylor_paths, input_paths=down_paths if needs_inputs else [],
            gram=want_gram, fire_threshold=c.frequency_threshold if c.score == "frequency" else None,
            batch_size=ctx.batch_size, progress=ctx.progress, desc=f"channel scores ({c.score})",
        )
        scores = {i: self.layer_scores(ctx, stats, i, widths[i]).float() for i in range(n_layers)}
        dense = copy.deepcopy(model).eval() if sequential else None  # targets: the model before this stage

        keep_n: dict[int, int] = {}
        rounding = {}
        if c.allocation == "uniform":
            for i in cand:
                keep_n[i], want = aligned_keep(widths[i], c)
                rounding[i] = want - keep_n[i]
        else:  # global: rank raw scores across layers (as head_prune does), then align each layer's kept width
            total_keep = 0
            for i in cand:
                k, want = aligned_keep(widths[i], c)
                total_keep += want
            normed = [(float(s), i) for i in cand for s in scores[i]]
            normed.sort(reverse=True)
            counts = {i: 0 for i in cand}
            for _, i in normed[:total_keep]:
                counts[i] += 1
            for i in cand:
                want = max(counts[i], c.align)
                keep_n[i] = min(max(c.align, want // c.align * c.align), widths[i])
                rounding[i] = want - keep_n[i]

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
                    new_w, err = repair_paired(w_old, *grams, c.reconstruct_damp)
                    err["rel_error_slice_dense_inputs"] = relative_error(w_old.cpu(), grams[0], keep, w_old.cpu()[:, keep])
                    with torch.no_grad():
                        get_module(layers[i], adapter.layer.down).weight.copy_(new_w)
                    entry.update(err)
                elif c.reconstruct == "least_squares":
                    new_w, err = repair(w_old, stats.gram[down_paths[i]], keep, c.reconstruct_damp)
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
            "sequential": sequential,
            "scoring_seconds": round(stats.seconds, 3), "scoring_peak_rss_mb": round(stats.peak_rss_mb, 1),
            "layers": per_layer,
        }


def _channel_obs_costs(w: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """OBS single-channel cost sum_o W[o, j]^2 / P[j, j], P = (C + lambda I)^-1."""
    w, gram = w.detach().double().cpu(), gram.double()
    lam = damp * float(torch.diagonal(gram).mean().clamp_min(1e-12))
    p = torch.linalg.pinv(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))
    return (w.pow(2).sum(0) / torch.diagonal(p).clamp_min(1e-300)).float()
