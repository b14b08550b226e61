"""From what a score needs to one calibration pass: which modules to watch and which statistics to keep.

Heads are watched at the attention output projection's input (o) and through the q/k/v/o weights; channels
at the MLP output projection's input (down) and through the gate/up/down weights.
"""

from __future__ import annotations

import torch

from gqaprune.arch.adapter import head_dim_of, model_shapes
from gqaprune.scoring.base import GRADIENT_STATISTICS
from gqaprune.scoring.stats import Stats, ablation_scores, collect_stats, role_paths

WEIGHT_ROLES = {"heads": ["q", "k", "v", "qkv", "o"], "channels": ["gate", "up", "gate_up", "down"]}
INPUT_ROLE = {"heads": "o", "channels": "down"}


def gather_stats(needs: frozenset, model, adapter, calib: torch.Tensor, *, axis: str, unit: str = "group",
                 fire_threshold: float | None = None, batch_size: int = 8, progress: bool = True,
                 desc: str = "scoring", hold_from: int | None = None) -> Stats:
    """The statistics ``needs`` (gqaprune.scoring.base.STATISTICS) for every decoder layer, in one pass
    (plus one pass per unit for ablation). ``gram`` is also what a one-shot least-squares repair needs;
    ``hold_from`` (a token index) also keeps the inputs of the tokens from there on (Stats.held)."""
    n_layers = len(model_shapes(model, adapter))
    input_paths = [role_paths(adapter, i, [INPUT_ROLE[axis]])[INPUT_ROLE[axis]] for i in range(n_layers)]
    taylor_paths = []
    if needs & GRADIENT_STATISTICS:
        for i in range(n_layers):
            taylor_paths += list(role_paths(adapter, i, WEIGHT_ROLES[axis]).values())
    watch_inputs = bool(needs & {"gram", "input_sq", "head_norm", "fire"})
    stats = collect_stats(
        model, calib, taylor_paths=taylor_paths, taylor2="taylor2" in needs,
        input_paths=input_paths if watch_inputs else [],
        head_norm_paths=input_paths if "head_norm" in needs else [], head_dim=head_dim_of(model.config, adapter),
        gram="gram" in needs, fire_threshold=fire_threshold if "fire" in needs else None,
        batch_size=batch_size, progress=progress, desc=desc, hold_from=hold_from if "gram" in needs else None)
    if "ablation" in needs:
        stats.ablation = ablation_scores(model, calib, _ablation_units(model, adapter, input_paths, unit),
                                         batch_size, progress, desc=f"{desc}, ablation")
    return stats


def _ablation_units(model, adapter, o_paths: list[str], unit: str) -> dict[str, list[torch.Tensor]]:
    """o path -> each unit's o_proj input columns: a group's (unit: group) or a query head's."""
    hd = head_dim_of(model.config, adapter)
    units = {}
    for i, s in enumerate(model_shapes(model, adapter)):
        nq, nkv = s["num_attention_heads"], s["num_key_value_heads"]
        size = nq // nkv * hd if unit == "group" else hd
        units[o_paths[i]] = [torch.arange(u * size, (u + 1) * size) for u in range(nq * hd // size)]
    return units
