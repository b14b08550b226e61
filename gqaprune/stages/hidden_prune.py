"""hidden_prune: remove residual-stream channels (hidden_size) from every matrix that touches the stream.

Optionally rotates the stream onto its principal directions first (``rotate: pca``, one Q for the whole
model so the architecture stays stock), scores the channels, slices them everywhere (gqaprune.ops.hidden)
and refits the input projections layer by layer (``reconstruct: least_squares``).

Scores (higher = kept): activation (Minitron: per-channel L2 over the calibration tokens of each norm's
output, i.e. of what every reader sees, summed over the readers' sites), magnitude (L2 of every weight on
the channel: embedding column, reader columns, writer rows, untied LM-head column), taylor (|w*g| summed
over those weights, LM loss on the calibration windows), random (seeded).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, model_validator

from gqaprune.arch.adapter import Adapter, decoder_layers, get_module
from gqaprune.context import RunContext
from gqaprune.ops.hidden import (is_tied, pca_rotation, prune_hidden, reader_groups, repair_readers, rotate_residual,
                                 rotation_problem, writers)
from gqaprune.errors import InputError
from gqaprune.schema import HeldOutReconstructs, one_of
from gqaprune.scoring.stats import collect_stats
from gqaprune.stages.amounts import aligned_keep
from gqaprune.stages.base import PlanInput, Planned, Stage, unchanged
from gqaprune.stages.repair import repair_choices


class HiddenPruneStage(HeldOutReconstructs):
    type: Literal["hidden_prune"]
    prune_ratio: float | None = Field(None, gt=0, lt=1, description="fraction of hidden_size removed")
    keep: int | None = Field(None, ge=1, description="hidden_size kept")
    align: int = Field(64, ge=1, description="kept hidden_size is a multiple of this (AWQ group size 128 needs 128)")
    score: Literal["activation", "magnitude", "taylor", "random"] = Field(
        "activation", description="activation: per-channel L2 of every norm's output over the calibration tokens "
        "(Minitron); magnitude: L2 of every weight on the channel; taylor: |w*g| summed over them; random (seeded)."
        " With rotate: pca the channels scored are the principal directions")
    reconstruct_holdout: float = Field(
        0.0, ge=0, lt=1, description="the fraction of the calibration windows held out to choose, per reader, the "
        "damping (reconstruct_damp, 10, 100 or 1000 times it) or no refit; default 0, a fixed reconstruct_damp: on "
        "SmolLM2-135M the held-out choice lost to it at every budget measured (benchmarks/RESULTS.md)")
    rotate: Literal["none", "pca"] = Field(
        "none", description="pca: rotate the residual stream onto the principal directions of the calibration "
        "activations first (norm weights folded into the projections; a tied LM head is untied)")

    @model_validator(mode="after")
    def _amount(self):
        one_of(self, ["prune_ratio", "keep"], "hidden_prune")
        return self


def kept_width(width: int, cfg: HiddenPruneStage, where: str = "hidden_prune") -> tuple[int, int]:
    """(kept hidden size, width before alignment)."""
    return aligned_keep(width, cfg, where, what="hidden size")


def _stream_paths(model, adapter: Adapter) -> tuple[list[str], list[str]]:
    """Full module paths of (readers incl. an untied LM head, writers)."""
    readers, outs = [], []
    for i in range(len(decoder_layers(model, adapter))):
        prefix = f"{adapter.model.layers}.{i}."
        readers += [prefix + p for _, group in reader_groups(adapter) for p in group]
        outs += [prefix + p for p in writers(adapter)]
    if not is_tied(model, adapter):
        readers.append(adapter.model.lm_head)
    return readers, outs


def channel_scores(ctx: RunContext, score: str, width: int) -> torch.Tensor:
    """(width,) importance of each residual-stream channel of ``ctx.model`` as it is now."""
    model, adapter = ctx.model, ctx.adapter
    readers, outs = _stream_paths(model, adapter)
    embed = adapter.model.embed
    if score == "random":
        return torch.rand(width, generator=ctx.generator(4000))
    if score == "magnitude":
        s = get_module(model, embed).weight.detach().float().pow(2).sum(0)
        s = s + sum(get_module(model, p).weight.detach().float().pow(2).sum(0) for p in readers)
        s = s + sum(get_module(model, p).weight.detach().float().pow(2).sum(1) for p in outs)
        s = s + sum(get_module(model, p).bias.detach().float().pow(2) for p in outs if get_module(model, p).bias is not None)
        return s.sqrt()
    if score == "taylor":
        stats = collect_stats(model, ctx.calib, taylor_paths=[embed] + readers + outs, batch_size=ctx.batch_size,
                              progress=ctx.progress, desc="hidden channel scores (taylor)")
        return (stats.taylor[embed].cols + sum(stats.taylor[p].cols for p in readers)
                + sum(stats.taylor[p].rows for p in outs))
    if score == "activation":  # one site per norm output: the first reader of each group, and the LM head
        sites = []
        for i in range(len(decoder_layers(model, adapter))):
            sites += [f"{adapter.model.layers}.{i}.{group[0]}" for _, group in reader_groups(adapter)]
        sites.append(adapter.model.lm_head)
        stats = collect_stats(model, ctx.calib, input_paths=sites, batch_size=ctx.batch_size, progress=ctx.progress,
                              desc="hidden channel scores (activation)")
        return sum(stats.sq[p].sqrt() for p in sites)
    raise ValueError(score)  # pragma: no cover


class HiddenPrune(Stage):
    name = "hidden_prune"
    Config = HiddenPruneStage

    def plan(self, shapes: list[dict], inp: PlanInput) -> Planned:
        """The kept width (aligned); layer shapes stay. counts: hidden_size, and rotate (the meta model's
        surgery in gqaprune.plan checks the rotation and unties a tied head there)."""
        c = self.cfg
        width = int(getattr(inp.config, inp.adapter.config.hidden_size))
        kept, want = kept_width(width, c, inp.where)
        notes = [f"keeps hidden size {kept} instead of {want} to align to {c.align}"] if kept != want else []
        notes.append("which channels go is decided by the scores at run time")
        return Planned(unchanged(shapes), notes, {"hidden_size": kept, "want": want, "rotate": c.rotate})

    @classmethod
    def card_what(cls, s: dict) -> str:
        what = (f"residual-stream channels by {s['score']} (rotate {s['rotate']}, reconstruct {s['reconstruct']}, "
                f"align {s['align']}); hidden size {s['hidden_size_before']} -> {s['hidden_size_after']}")
        if "repair" in s:
            what += (f"; reader error mean {s['repair']['mean_rel_error_slice']:.3f} sliced -> "
                     f"{s['repair']['mean_rel_error_lsq']:.3f} refit")
        if s.get("untied_lm_head"):
            what += "; LM head untied from the embedding (rotation)"
        return what

    def apply(self, ctx: RunContext) -> dict:
        c, model, adapter = self.cfg, ctx.model, ctx.adapter
        width = int(getattr(model.config, adapter.config.hidden_size))
        keep_n, want = kept_width(width, c)
        entry: dict = {"score": c.score, "rotate": c.rotate, "reconstruct": c.reconstruct, "align": c.align,
                       "hidden_size_before": width, "alignment_rounded_down_by": want - keep_n}
        if c.rotate == "pca":
            problem = rotation_problem(model, adapter)
            if problem:
                raise InputError(f"hidden_prune: {problem}")
            entry["untied_lm_head"] = is_tied(model, adapter)
            q, evals = pca_rotation(model, adapter, ctx.calib, ctx.batch_size, ctx.progress)
            rotate_residual(model, adapter, q)
            entry["pca_variance_kept_top"] = float(evals[:keep_n].sum() / evals.sum().clamp_min(1e-300))
        scores = channel_scores(ctx, c.score, width).float()
        assert scores.shape == (width,), scores.shape
        order = torch.argsort(scores, descending=True, stable=True)
        keep = torch.sort(order[:keep_n]).values
        dense = copy.deepcopy(model).eval() if c.reconstruct == "least_squares" else None
        prune_hidden(model, adapter, keep)
        if dense is not None:
            errors = repair_readers(dense, model, adapter, ctx.calib, ctx.batch_size, c.reconstruct_damp, ctx.progress,
                                    c.reconstruct_holdout)
            del dense
            entry["repair"] = _summarise(errors)
        entry["hidden_size_after"] = keep_n
        entry["score_summary"] = {"min": float(scores.min()), "median": float(scores.median()),
                                  "max": float(scores.max()), "kept_fraction_of_total": float(scores[keep].sum() / scores.sum())}
        return entry


def _summarise(errors: dict) -> dict:
    """Per-layer reader errors as they are, the mean over all readers (slice vs repaired), and how many readers
    kept each held-out choice (None without one)."""
    flat = [e for layer in errors["layers"] for k, e in layer.items() if k != "layer"]
    if isinstance(errors["lm_head"], dict):
        flat.append(errors["lm_head"])
    return {"mean_rel_error_slice": sum(e["rel_error_slice"] for e in flat) / len(flat),
            "mean_rel_error_lsq": sum(e["rel_error_lsq"] for e in flat) / len(flat),
            "repair_choices": repair_choices(flat), "layers": errors["layers"], "lm_head": errors["lm_head"]}
