"""magnitude: L2 norm of a unit's weights (no data). Heads: q rows + o columns per query head, k + v rows per
KV head. Channels: the gate/up rows and down column."""

from __future__ import annotations

import torch

from gqaprune.arch.adapter import get_module
from gqaprune.scoring.base import LayerInput, Score
from gqaprune.scoring.scores.taylor import _blocks


def _sq(layer, path: str, dim: int) -> torch.Tensor:
    return get_module(layer, path).weight.detach().float().pow(2).sum(dim)


class HeadMagnitude(Score):
    name, axis = "magnitude", "heads"
    needs = frozenset()

    def compute(self, u: LayerInput):
        r, nq, nkv, hd = u.adapter.layer, u.n_q, u.n_kv, u.head_dim
        o2 = _sq(u.layer, r.o, 0)  # (n_q * hd,) per o column
        if r.fused_qkv:
            rows2 = _sq(u.layer, r.qkv, 1)
            q2 = _blocks(rows2, nq, 0, hd)
            kv2 = _blocks(rows2, nkv, nq * hd, hd) + _blocks(rows2, nkv, (nq + nkv) * hd, hd)
        else:
            q2 = _blocks(_sq(u.layer, r.q, 1), nq, 0, hd)
            kv2 = _blocks(_sq(u.layer, r.k, 1), nkv, 0, hd) + _blocks(_sq(u.layer, r.v, 1), nkv, 0, hd)
        return (q2 + _blocks(o2, nq, 0, hd)).sqrt(), kv2.sqrt()


class ChannelMagnitude(Score):
    name, axis = "magnitude", "channels"
    needs = frozenset()

    def compute(self, u: LayerInput):
        r = u.adapter.layer
        s = _sq(u.layer, r.down, 0)  # (width,) per down column
        width = s.shape[0]
        if r.fused_gate_up:
            rows = _sq(u.layer, r.gate_up, 1)
            s = s + rows[:width] + rows[width:]
        else:
            for role in ("gate", "up"):
                p = getattr(r, role)
                if p is not None:
                    s = s + _sq(u.layer, p, 1)
        return s.sqrt()
