"""Least-squares repair of a consuming projection after some of its inputs are removed.

With C = X^T X the Gram matrix of the projection's inputs over the calibration
tokens (float64) and K the kept input indices, the kept weight that best
reproduces the original output W X from X_K is

    W_new = W C[:, K] (C[K, K] + lambda I)^-1,   lambda = damp * mean(diag C[K, K])

(GPTQ-style damping). Errors are relative output errors ||W X - W' X_K||^2 / ||W X||^2,
computed from C without the activations. C may come in float32 (gqaprune.scoring.stats accumulates
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


def _solve(c_kk: torch.Tensor, wc_k: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, bool]:
    """W_new = (W C[:, K]) (C[K,K] + lambda I)^-1 from wc_k = W C[:, K] (out, |K|); returns (W_new, lambda,
    whether the Cholesky solve succeeded)."""
    lam = damp * float(torch.diagonal(c_kk).mean().clamp_min(1e-12))
    a = c_kk + lam * torch.eye(c_kk.shape[0], dtype=c_kk.dtype)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(wc_k.T, chol).T, lam, True
    # kept block not positive definite even after damping: least-norm solution
    return (torch.linalg.pinv(a) @ wc_k.T).T, lam, False


def solve_kept_weight(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The least-squares W_new (out, |K|) in float64; falls back to a pseudo-inverse if C[K,K] is singular."""
    w, c = w.double(), c.double()
    return _solve(c[keep][:, keep], w @ c[:, keep], damp)[0]


def repair(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Kept weight in w's dtype, and the relative errors of plain slicing and of the solve.

    The errors are those of relative_error(), computed from products the solve needs anyway: with
    K kept and R removed inputs, den = tr(W C W^T) = <W C[:,K], W_K> + <W C[:,R], W_R>, slicing's
    numerator is tr(W_R C_RR W_R^T), and for the damped optimum W' (C_KK + lambda I) = W C[:,K] the
    solve's numerator den - 2<W C[:,K], W'> + tr(W' C_KK W'^T) equals den - <W C[:,K], W'> - lambda |W'|^2."""
    keep = keep.to(torch.long).cpu()
    w_cpu = w.detach().cpu()
    c = c.detach().double().cpu()
    w64 = w_cpu.double()
    removed = torch.ones(w64.shape[1], dtype=torch.bool)
    removed[keep] = False
    w_k, w_r = w64[:, keep], w64[:, removed]
    wc_k = w64 @ c[:, keep]  # (out, |K|)
    new, lam, exact = _solve(c[keep][:, keep], wc_k, damp)
    den = (wc_k * w_k).sum() + ((w64 @ c[:, removed]) * w_r).sum()
    den = den.clamp_min(1e-300)
    err_slice = float(_quad(w_r, c[removed][:, removed]) / den)
    err_ls = float((den - (wc_k * new).sum() - lam * new.pow(2).sum()) / den) if exact else -1.0
    if not 0.0 <= err_ls <= err_slice:  # least-norm fallback or rounding: the direct formula
        d = w64.clone()
        d[:, keep] -= new
        err_ls = float(_quad(d, c) / den)
    if err_ls > err_slice:  # damping can, rarely, lose to slicing: never make the layer worse
        new, err_ls = w_k, err_slice
    return new.to(dtype=w.dtype, device=w.device), {"rel_error_slice": err_slice, "rel_error_lsq": err_ls}


def _quad(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """tr(A C A^T) = sum_oij A[o,i] C[i,j] A[o,j]."""
    return ((a @ c) * a).sum()


def repair_paired(w: torch.Tensor, c_dense: torch.Tensor, cross: torch.Tensor, c_kept: torch.Tensor,
                  damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Sequential repair: the kept weight W' minimizing ||W X - W' X'_K||^2.

    X are the projection's inputs in the unpruned model, X'_K the kept inputs in the model whose
    earlier layers are already pruned. c_dense = X^T X (in, in), cross = X^T X'_K (in, k),
    c_kept = X'_K^T X'_K (k, k). W' = W cross (c_kept + lambda I)^-1.
    """
    w64 = w.detach().double().cpu()
    new = _solve(c_kept, w64 @ cross, damp)[0]  # (out, k)

    def err(wk):
        num = (torch.einsum("oi,ij,oj->", w64, c_dense, w64) - 2 * torch.einsum("oi,ik,ok->", w64, cross, wk)
               + torch.einsum("ok,kl,ol->", wk, c_kept, wk))
        return float(num / torch.einsum("oi,ij,oj->", w64, c_dense, w64).clamp_min(1e-300))

    return new.to(dtype=w.dtype, device=w.device), {"rel_error_lsq": err(new)}


def repair_residual(w: torch.Tensor, c: torch.Tensor, cross: torch.Tensor, delta_sq: float,
                    damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Layer-drop repair: teach a kept projection to also write what dropped layers wrote.

    With X the projection's inputs (in) and D the dropped layers' contribution to the residual stream
    (out) over the calibration tokens, c = X^T X (in, in), cross = X^T D (in, out) and delta_sq = ||D||^2,
    the weight W' = W + E minimizing ||E X - D||^2 + lambda ||E||^2 (damping pulls toward the original
    weight, so E = 0 is always a candidate and the result is never worse than dropping alone) is
    E = cross^T (C + lambda I)^-1. Errors are relative to ||D||^2: 1.0 before the solve (nothing of D
    is reproduced), ||E X - D||^2 / ||D||^2 after.
    """
    w64, c, cross = w.detach().double().cpu(), c.detach().double().cpu(), cross.detach().double().cpu()
    e = _solve(c, cross.T, damp)[0]  # (out, in): cross^T (C + lambda I)^-1
    resid = _quad(e, c) - 2 * (e * cross.T).sum() + delta_sq
    err = float(resid / max(delta_sq, 1e-300))
    if not err <= 1.0:  # rounding on a degenerate case: keep the layer as it was
        e, err = torch.zeros_like(e), 1.0
    return (w64 + e).to(dtype=w.dtype, device=w.device), {"rel_error_drop": 1.0, "rel_error_lsq": err}
