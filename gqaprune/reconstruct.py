"""Least-squares repair of a consuming projection after some of its inputs are removed.

With C = X^T X the Gram matrix of the projection's inputs over the calibration
tokens (float64) and K the kept input indices, the kept weight that best
reproduces the original output W X from X_K is

    W_new = W C[:, K] (C[K, K] + lambda I)^-1,   lambda = damp * mean(diag C[K, K])

(GPTQ-style damping). Errors are relative output errors ||W X - W' X_K||^2 / ||W X||^2,
computed from C without the activations. C may come in float32 (gqaprune.scoring accumulates
it so); every function here widens it to float64 first, one matrix at a time.
"""

from __future__ import annotations

import torch


def relative_error(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, w_kept: torch.Tensor) -> float:
    """||W X - W_kept X_K||^2 / ||W X||^2 from the Gram matrix; w (out, in), w_kept (out, |K|)."""
    w, c = w.double(), c.double()
    d = w.clone()
    d[:, keep] -= w_kept.double()
    num = torch.einsum("oi,ij,oj->", d, c, d)
    den = torch.einsum("oi,ij,oj->", w, c, w)
    return float(num / den.clamp_min(1e-300))


def solve_kept_weight(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The least-squares W_new (out, |K|) in float64; falls back to a pseudo-inverse if C[K,K] is singular."""
    w, c = w.double(), c.double()
    c_kk = c[keep][:, keep]
    lam = damp * float(torch.diagonal(c_kk).mean().clamp_min(1e-12))
    a = c_kk + lam * torch.eye(len(keep), dtype=c.dtype)
    rhs = (w @ c[:, keep]).T  # (|K|, out)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        sol = torch.cholesky_solve(rhs, chol)
    else:  # kept block not positive definite even after damping: least-norm solution
        sol = torch.linalg.pinv(a) @ rhs
    return sol.T  # (out, |K|)


def repair(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Kept weight in w's dtype, and the relative errors of plain slicing and of the solve."""
    keep = keep.to(torch.long).cpu()
    w_cpu = w.detach().cpu()
    c = c.detach().double().cpu()
    new = solve_kept_weight(w_cpu, c, keep, damp)
    # the two relative errors of relative_error(), sharing the denominator; slicing's numerator only
    # involves the removed inputs R: tr(W_R C_RR W_R^T)
    w64 = w_cpu.double()
    den = _quad(w64, c).clamp_min(1e-300)
    removed = torch.ones(w64.shape[1], dtype=torch.bool)
    removed[keep] = False
    w_r = w64[:, removed]
    err_slice = float(_quad(w_r, c[removed][:, removed]) / den)
    d = w64.clone()
    d[:, keep] -= new
    err_ls = float(_quad(d, c) / den)
    if err_ls > err_slice:  # damping can, rarely, lose to slicing: never make the layer worse
        new, err_ls = w_cpu[:, keep].double(), err_slice
    return new.to(dtype=w.dtype, device=w.device), {"rel_error_slice": err_slice, "rel_error_lsq": err_ls}


def _quad(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """tr(A C A^T) = sum_oij A[o,i] C[i,j] A[o,j]."""
    return ((a @ c) * a).sum()


def obs_block_costs(w: torch.Tensor, c: torch.Tensor, blocks: list[torch.Tensor], damp: float = 0.01) -> torch.Tensor:
    """OBS-style error of removing each block of inputs alone (others repaired by least squares).

    With H = C + lambda I and P = H^-1, removing block B and re-solving the rest raises the
    output error by tr(W_B' (P_BB)^-1 W_B'^T) where W' is the least-squares optimum of the full set
    (here W itself, since all inputs are kept). Lower cost = safer to remove.
    """
    w, c = w.detach().double().cpu(), c.double()
    lam = damp * float(torch.diagonal(c).mean().clamp_min(1e-12))
    p = torch.linalg.pinv(c + lam * torch.eye(c.shape[0], dtype=c.dtype))
    costs = []
    for b in blocks:
        wb = w[:, b]  # (out, |B|)
        pbb_inv = torch.linalg.pinv(p[b][:, b])
        costs.append(torch.einsum("oi,ij,oj->", wb, pbb_inv, wb))
    return torch.stack(costs).float()


def repair_paired(w: torch.Tensor, c_dense: torch.Tensor, cross: torch.Tensor, c_kept: torch.Tensor,
                  damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Sequential repair: the kept weight W' minimizing ||W X - W' X'_K||^2.

    X are the projection's inputs in the unpruned model, X'_K the kept inputs in the model whose
    earlier layers are already pruned. c_dense = X^T X (in, in), cross = X^T X'_K (in, k),
    c_kept = X'_K^T X'_K (k, k). W' = W cross (c_kept + lambda I)^-1.
    """
    w64 = w.detach().double().cpu()
    k = c_kept.shape[0]
    lam = damp * float(torch.diagonal(c_kept).mean().clamp_min(1e-12))
    a = c_kept + lam * torch.eye(k, dtype=c_kept.dtype)
    rhs = (w64 @ cross).T  # (k, out)
    chol, info = torch.linalg.cholesky_ex(a)
    sol = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.pinv(a) @ rhs
    new = sol.T  # (out, k)

    def err(wk):
        num = (torch.einsum("oi,ij,oj->", w64, c_dense, w64) - 2 * torch.einsum("oi,ik,ok->", w64, cross, wk)
               + torch.einsum("ok,kl,ol->", wk, c_kept, wk))
        return float(num / torch.einsum("oi,ij,oj->", w64, c_dense, w64).clamp_min(1e-300))

    return new.to(dtype=w.dtype, device=w.device), {"rel_error_lsq": err(new)}
