"""Per-channel statistics of the inputs of every layer's attention and MLP output projections,
from one pass of the dense model over the calibration windows (what FLAP and Wanda-sp score with)."""

from __future__ import annotations

import torch


def projection_input_stats(model, calib: torch.Tensor, batch_size: int = 8) -> dict[tuple[int, str], dict]:
    """{(layer, "o" | "down"): {"mean", "var", "msq"}}: per input channel, over all calibration tokens,
    the mean, the (population) variance and the mean square of the projection's input."""
    sums: dict[tuple[int, str], list] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for role, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            def hook(m, args, key=(i, role)):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])  # (tokens, in)
                s = sums.setdefault(key, [0, torch.zeros(x.shape[1], dtype=torch.float64),
                                          torch.zeros(x.shape[1], dtype=torch.float64)])
                s[0] += x.shape[0]
                s[1] += x.sum(0)
                s[2] += x.pow(2).sum(0)
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in range(0, calib.shape[0], batch_size):
                model(input_ids=calib[b: b + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, (n, s1, s2) in sums.items():
        mean, msq = s1 / n, s2 / n
        out[key] = {"mean": mean.float(), "var": (msq - mean.pow(2)).clamp_min(0).float(), "msq": msq.float()}
    return out


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once
