"""Statistics of the residual stream between decoder layers: hidden states, their norms, cosine
similarities between layers, and what a run of layers adds (for layer-drop repair)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from gqaprune.arch.adapter import decoder_layers, get_module

def layer_hidden_states(model, adapter, ids: torch.Tensor) -> list[torch.Tensor]:
    """[h_0 .. h_L]: the input of every decoder layer and the output of the last, (B, T, H) each, all on
    ``ids``'s device (under runtime.device_map the layers may sit on different GPUs)."""
    layers = decoder_layers(model, adapter)
    states: list[torch.Tensor | None] = [None] * (len(layers) + 1)
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            states[i] = (args[0] if args else kwargs["hidden_states"]).detach().float().to(ids.device)
        def post(mod, args, kwargs, out, i=i):
            if i == len(layers) - 1:
                states[i + 1] = (out[0] if isinstance(out, tuple) else out).detach().float().to(ids.device)
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return states

def layer_input_sq_norms(model, adapter, calib: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(L,): median over calibration tokens of ||h_i||^2, the squared norm of each layer's residual-stream input.

    The median, not the mean: real models carry massive activations on a few sink tokens (SmolLM2-135M, from
    layer 12 on: one channel near 25,000 on the first token while a typical token's norm is near 140), and
    the mean of ||h||^2 is then the sink's alone, 500x the typical token's. Divided by that, every head after
    the sink looked cheap to global allocation, which then stripped those layers."""
    n = len(decoder_layers(model, adapter))
    per_token = []  # (tokens,) per batch and layer
    device = next(model.parameters()).device
    for b in range(0, calib.shape[0], batch_size):
        hs = layer_hidden_states(model, adapter, calib[b: b + batch_size].to(device))[:n]
        per_token.append(torch.stack([h.double().pow(2).sum(-1).reshape(-1) for h in hs]).cpu())  # (L, tokens)
    return torch.cat(per_token, dim=1).median(dim=1).values

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

def residual_stats(model, adapter, calib: torch.Tensor, runs: list[tuple[int, int]], batch_size: int,
                   progress: bool = True) -> dict[int, tuple]:
    """For each run (s, e) with s >= 1, over the calibration tokens: the Gram C = X^T X of the down
    projection's inputs in layer s-1 (in, in), cross = X^T (h_e - h_s) (in, hidden) and ||h_e - h_s||^2.
    One pass of the unpruned model; float32 in-place accumulation as in gqaprune.scoring."""
    layers = decoder_layers(model, adapter)
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for s, _ in runs:
        if s == 0:
            continue
        down = get_module(layers[s - 1], adapter.layer.down)
        handles.append(down.register_forward_pre_hook(
            lambda mod, args, s=s: inputs.__setitem__(s, args[0].detach().float())))
    out: dict[int, list] = {}
    device = next(model.parameters()).device
    try:
        for b in tqdm(range(0, calib.shape[0], batch_size), desc="layer repair stats", disable=not progress,
                      leave=False):
            hs = layer_hidden_states(model, adapter, calib[b: b + batch_size].to(device))
            for s, e in runs:
                if s == 0:
                    continue
                x = inputs[s].reshape(-1, inputs[s].shape[-1])  # (tokens, in)
                d = (hs[e] - hs[s]).reshape(x.shape[0], -1).to(x.device)  # (tokens, hidden): what the run added
                if s not in out:
                    out[s] = [torch.zeros(x.shape[1], x.shape[1], device=x.device),
                              torch.zeros(x.shape[1], d.shape[1], device=x.device), 0.0]
                out[s][0].addmm_(x.T, x)
                out[s][1].addmm_(x.T, d)
                out[s][2] += float(d.double().pow(2).sum())
    finally:
        for h in handles:
            h.remove()
    return {s: tuple(v) for s, v in out.items()}
