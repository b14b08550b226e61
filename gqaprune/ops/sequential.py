"""Sequential calibration: inputs of one layer's projection in the dense and in the pruned model.

With `calibration.sequential: true`, pruning stages repair layer l only after layers < l are
pruned and repaired, so layer l's solve sees the inputs the pruned prefix really produces,
while its target is what the unpruned model produced. Per layer, both models run the
calibration windows only up to that layer (the forward stops there) with one hook each:
only one layer's statistics exist at a time.
"""

from __future__ import annotations

import torch

from gqaprune.arch.adapter import decoder_layers


class _StopForward(Exception):
    pass


def _layer_inputs(model, adapter, layer_idx: int, role_path: str, ids: torch.Tensor) -> torch.Tensor:
    """Input of ``role_path`` in decoder layer ``layer_idx`` for ``ids``: (tokens, in). Stops the forward there."""
    layer = decoder_layers(model, adapter)[layer_idx]
    captured = {}

    def hook(mod, args):
        captured["x"] = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        raise _StopForward

    h = layer.get_submodule(role_path).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        h.remove()
    return captured["x"]


def paired_grams(dense, model, adapter, layer_idx: int, role_path: str, calib: torch.Tensor,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X^T X, X^T X', X'^T X') of the projection's inputs: X in ``dense``, X' in ``model`` (float64)."""
    device = next(model.parameters()).device
    c_dense = cross = c_kept = 0
    for b in range(0, calib.shape[0], batch_size):
        ids = calib[b: b + batch_size].to(device)
        x = _layer_inputs(dense, adapter, layer_idx, role_path, ids)  # (tokens, in)
        xp = _layer_inputs(model, adapter, layer_idx, role_path, ids)  # (tokens, k)
        c_dense = c_dense + x.T @ x
        cross = cross + x.T @ xp
        c_kept = c_kept + xp.T @ xp
    return c_dense, cross, c_kept
