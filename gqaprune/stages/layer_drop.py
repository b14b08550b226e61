"""layer_drop: remove whole decoder layers by block influence (ShortGPT) or angular distance (Gromov et al.).

block_influence: BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}) (input and output of layer i);
the num_layers lowest-BI layers outside the protected ends are dropped.
angular_block: d(l, n) = mean over tokens of arccos(cos(h_l, h_{l+n})) / pi; the contiguous
run of n layers with the smallest d is dropped (Gromov et al. use the last token; we average
over all tokens of the calibration windows).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from gqaprune.adapters import decoder_layers
from gqaprune.context import RunContext
from gqaprune.recipe import LayerDropStage
from gqaprune.surgery import drop_layers


def layer_hidden_states(model, adapter, ids: torch.Tensor) -> list[torch.Tensor]:
    """[h_0 .. h_L]: the input of every decoder layer and the output of the last, (B, T, H) each."""
    layers = decoder_layers(model, adapter)
    states: list[torch.Tensor | None] = [None] * (len(layers) + 1)
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            states[i] = (args[0] if args else kwargs["hidden_states"]).detach().float()
        def post(mod, args, kwargs, out, i=i):
            if i == len(layers) - 1:
                states[i + 1] = (out[0] if isinstance(out, tuple) else out).detach().float()
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return states


def layer_distances(model, adapter, calib: torch.Tensor, batch_size: int, progress: bool = True) -> torch.Tensor:
    """D[i, j] = mean over tokens of cos(h_i, h_j), for all 0 <= i < j <= L: (L+1, L+1)."""
    n = len(decoder_layers(model, adapter)) + 1
    sums = torch.zeros(n, n, dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    for b in tqdm(range(0, calib.shape[0], batch_size), desc="layer scores", disable=not progress, leave=False):
        hs = layer_hidden_states(model, adapter, calib[b: b + batch_size].to(device))
        flat = torch.stack([h.reshape(-1, h.shape[-1]) for h in hs])  # (L+1, tokens, H)
        unit = torch.nn.functional.normalize(flat, dim=-1)
        sums += torch.einsum("ith,jth->ij", unit, unit).double().cpu()
        count += flat.shape[1]
    return sums / count


class LayerDrop:
    def __init__(self, cfg: LayerDropStage):
        self.cfg = cfg

    def count(self, n_layers: int) -> int:
        c = self.cfg
        return c.num_layers if c.num_layers is not None else max(1, round(c.fraction * n_layers))

    def apply(self, ctx: RunContext) -> dict:
        c = self.cfg
        n_layers = len(decoder_layers(ctx.model, ctx.adapter))
        n = self.count(n_layers)
        lo, hi = c.protect_first, n_layers - c.protect_last  # candidates: [lo, hi)
        cos = layer_distances(ctx.model, ctx.adapter, ctx.calib, ctx.batch_size, ctx.progress)
        if c.score == "block_influence":
            scores = [1.0 - float(cos[i, i + 1]) for i in range(n_layers)]
            order = sorted(range(lo, hi), key=lambda i: (scores[i], i))
            dropped = sorted(order[:n])
        else:
            scores = [math.acos(max(-1.0, min(1.0, float(cos[i, i + n])))) / math.pi if i + n <= n_layers else None
                      for i in range(n_layers)]
            starts = [i for i in range(lo, hi - n + 1)]
            best = min(starts, key=lambda i: (scores[i], i))
            dropped = list(range(best, best + n))
        drop_layers(ctx.model, ctx.adapter, dropped)
        return {
            "score": c.score,
            "layer_scores": scores,
            "dropped_layers": dropped,
            "num_layers_before": n_layers,
            "num_layers_after": n_layers - len(dropped),
        }
