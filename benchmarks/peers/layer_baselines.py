"""Plain re-implementations of two layer-removal baselines, independent of gqaprune's layer_drop.

ShortGPT (Men et al. 2024): block influence BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}); the n layers
with the lowest BI go, any layer may go. Angular block (Gromov et al. 2024, "The Unreasonable Ineffectiveness
of the Deeper Layers"): d(l, n) = arccos(cos(h_l, h_{l+n})) / pi on the LAST token of each window, averaged
over windows; the contiguous block [l, l+n) with the smallest d goes (the final layer is kept). No repair.
"""

from __future__ import annotations

import math

import torch


def _hidden_states(model, calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """[h_0 .. h_L] per batch, concatenated: (L+1) tensors of (windows, T, hidden)."""
    per = []
    with torch.no_grad():
        for b in range(0, calib.shape[0], batch_size):
            out = model(input_ids=calib[b: b + batch_size], output_hidden_states=True, use_cache=False)
            per.append([h.float() for h in out.hidden_states])
    # HF applies the final norm to the last entry h_L: neither score below uses it
    return [torch.cat([p[k] for p in per]) for k in range(len(per[0]))]


def shortgpt_layers(model, calib: torch.Tensor, n: int, batch_size: int = 8) -> list[int]:
    hs = _hidden_states(model, calib, batch_size)
    n_layers = len(hs) - 1
    # the last layer's output reaches us only after the final norm: it is not a candidate (it never was
    # among the lowest BI in the ShortGPT paper's tables either)
    bi = [1 - float(torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean())
          for i in range(n_layers - 1)]
    return sorted(sorted(range(n_layers - 1), key=lambda i: bi[i])[:n])


def angular_block(model, calib: torch.Tensor, n: int, batch_size: int = 8) -> list[int]:
    hs = _hidden_states(model, calib, batch_size)
    n_layers = len(hs) - 1
    def dist(l):
        cos = torch.nn.functional.cosine_similarity(hs[l][:, -1], hs[l + n][:, -1], dim=-1).clamp(-1, 1)
        return float(torch.arccos(cos).mean()) / math.pi
    best = min(range(0, n_layers - n), key=dist)  # blocks [l, l+n) with l + n < L: the final layer stays
    return list(range(best, best + n))
