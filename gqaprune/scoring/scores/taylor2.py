"""taylor2: second-order Taylor importance, sum of (w * dL/dw)^2 / 2 over a head's parameters (the squared
gradient stands in for the Hessian diagonal); with taylor_mix, plus taylor_mix times the first-order sum."""

from __future__ import annotations

from gqaprune.scoring.base import LayerInput, Score
from gqaprune.scoring.scores.taylor import head_sums


class HeadTaylor2(Score):
    name, axis = "taylor2", "heads"
    needs = frozenset({"taylor", "taylor2"})  # taylor for taylor_mix (one backward pass fills both)
    needs_gradients, layer_local = True, False

    def compute(self, u: LayerInput):
        q, kv = head_sums(u.stats.taylor2, u)
        if u.taylor_mix:
            q1, kv1 = head_sums(u.stats.taylor, u)
            q, kv = q + u.taylor_mix * q1, kv + u.taylor_mix * kv1
        return q, kv
