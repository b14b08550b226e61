"""The one-shot least-squares repair of head_prune and neuron_prune, from a scoring pass's statistics.

With ``reconstruct_holdout`` > 0 the pass kept the inputs of the last calibration windows (Stats.held) and the
repair chooses its damping, or no refit, on them (gqaprune.ops.reconstruct.repair_held_out); otherwise it refits
with ``reconstruct_damp``. Shared by the in-memory stages and the layer-wise pipeline, so both choose alike.
"""

from __future__ import annotations

import torch

from gqaprune.ops.reconstruct import repair, repair_held_out
from gqaprune.schema import RepairMode, held_out_from
from gqaprune.scoring.stats import Stats


def hold_from(cfg, calib: torch.Tensor, mode: RepairMode) -> int | None:
    """The token index a scoring pass starts keeping held-out inputs at, for stage config ``cfg`` repairing in
    ``mode`` (None unless the repair is one-shot: a reconstruction score's Gram alone needs no held-out inputs)."""
    return held_out_from(tuple(calib.shape), cfg.reconstruct_holdout) if mode == "one_shot" else None


def one_shot_repair(cfg, w_old: torch.Tensor, stats: Stats, path: str, keep: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The repaired weight of projection ``path`` (w_old its weight before pruning, ``keep`` its kept inputs)."""
    held = stats.held.get(path)
    if held:
        return repair_held_out(w_old, stats.gram[path], keep, torch.cat(held), cfg.reconstruct_damp)
    return repair(w_old, stats.gram[path], keep, cfg.reconstruct_damp)


def repair_choices(per_layer: list[dict]) -> dict[str, int] | None:
    """How many layers kept each held-out choice ({"0.01": 20, "slice": 10}), or None without a held-out choice."""
    chosen = [str(e["damp_chosen"]) for e in per_layer if "damp_chosen" in e]
    return {k: chosen.count(k) for k in sorted(set(chosen))} if chosen else None
