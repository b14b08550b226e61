"""taylor: first-order Taylor importance, sum of |w * dL/dw| over a unit's parameters (the loss change of
removing it, to first order). Needs the gradients of the whole model's loss: not layer-local."""

from __future__ import annotations

import torch

from gqaprune.scoring.base import LayerInput, Score
from gqaprune.scoring.stats import LinearSums, role_paths


def _blocks(v: torch.Tensor, n: int, offset: int = 0, size: int = 1) -> torch.Tensor:
    """Sum ``v[offset : offset + n*size]`` in blocks of ``size`` -> (n,)."""
    return v[offset: offset + n * size].reshape(n, size).sum(1)


def head_sums(sums: dict[str, LinearSums], u: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (n_q,), kv (n_kv,)): per-row/column sums over each head's q rows + o columns, and k + v rows."""
    nq, nkv, hd = u.n_q, u.n_kv, u.head_dim
    paths = role_paths(u.adapter, u.index, ["q", "k", "v", "qkv", "o"])
    q_score = _blocks(sums[paths["o"]].cols, nq, 0, hd)
    if "qkv" in paths:
        rows = sums[paths["qkv"]].rows
        q_score = q_score + _blocks(rows, nq, 0, hd)
        kv_score = _blocks(rows, nkv, nq * hd, hd) + _blocks(rows, nkv, (nq + nkv) * hd, hd)
    else:
        q_score = q_score + _blocks(sums[paths["q"]].rows, nq, 0, hd)
        kv_score = _blocks(sums[paths["k"]].rows, nkv, 0, hd) + _blocks(sums[paths["v"]].rows, nkv, 0, hd)
    return q_score, kv_score


class HeadTaylor(Score):
    name, axis = "taylor", "heads"
    needs = frozenset({"taylor"})
    needs_gradients, layer_local = True, False

    def compute(self, u: LayerInput):
        return head_sums(u.stats.taylor, u)


class ChannelTaylor(Score):
    name, axis = "taylor", "channels"
    needs = frozenset({"taylor"})
    needs_gradients, layer_local = True, False

    def compute(self, u: LayerInput):
        paths = role_paths(u.adapter, u.index, ["gate", "up", "gate_up", "down"])
        sums = u.stats.taylor
        s = sums[paths["down"]].cols.clone()  # (width,)
        if "gate_up" in paths:
            rows = sums[paths["gate_up"]].rows  # (2 * width,): gate rows then up rows
            s += rows[:u.width] + rows[u.width: 2 * u.width]
        else:
            for role in ("gate", "up"):
                if role in paths:
                    s += sums[paths[role]].rows
        return s
