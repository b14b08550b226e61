"""OBS costs: the output error of removing a block of a projection's inputs, the rest refit by least squares.

With C = X^T X the Gram matrix of the inputs, H = C + lambda I and P = H^-1, removing block B and re-solving
the rest raises the output error by tr(W_B (P_BB)^-1 W_B^T) (W is the least-squares optimum of the full set,
since all inputs are kept). Lower cost = safer to remove.
"""

from __future__ import annotations

import torch


def _damped_inverse(c: torch.Tensor, damp: float) -> torch.Tensor:
    lam = damp * float(torch.diagonal(c).mean().clamp_min(1e-12))
    return torch.linalg.pinv(c + lam * torch.eye(c.shape[0], dtype=c.dtype))


def obs_block_costs(w: torch.Tensor, c: torch.Tensor, blocks: list[torch.Tensor], damp: float = 0.01) -> torch.Tensor:
    """(len(blocks),): the cost of removing each block of inputs alone; w (out, in), c (in, in)."""
    w, c = w.detach().double().cpu(), c.double()
    p = _damped_inverse(c, damp)
    costs = []
    for b in blocks:
        wb = w[:, b]  # (out, |B|)
        pbb_inv = torch.linalg.pinv(p[b][:, b])
        costs.append(torch.einsum("oi,ij,oj->", wb, pbb_inv, wb))
    return torch.stack(costs).float()


def channel_obs_costs(w: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """(in,): single-input costs sum_o W[o, j]^2 / P[j, j] (the one-column case of obs_block_costs)."""
    w, gram = w.detach().double().cpu(), gram.double()
    p = _damped_inverse(gram, damp)
    return (w.pow(2).sum(0) / torch.diagonal(p).clamp_min(1e-300)).float()
