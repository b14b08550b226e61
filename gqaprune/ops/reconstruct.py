"""Least-squares repair of a consuming projection after some of its inputs are removed.

With C = X^T X the Gram matrix of the projection's inputs over the calibration
tokens and K the kept input indices, the kept weight that best reproduces the original
output W X from X_K is

    W_new = W C[:, K] (C[K, K] + lambda I)^-1,   lambda = damp * mean(diag C[K, K])

(GPTQ-style damping). Errors are relative output errors ||W X - W' X_K||^2 / ||W X||^2,
computed from C without the activations.

Memory: the solves run in float64 (damped Grams of a few thousand tokens in ~10^4 dimensions are
badly conditioned in float32), but C may come in float32 (gqaprune.scoring.stats accumulates it so)
and is never widened whole: products with it are taken a column block at a time, and the one float64
(|K|, |K|) block a solve needs is damped in place (no identity matrix) and factored, so a solve holds
two (|K|, |K|) float64 matrices, the block and its Cholesky factor, plus the right-hand side and the
solution (out, |K|) (two triangular solves, the second in place). With A = C_KK + lambda I and the
solution W' A = B, tr(W' C_KK W'^T) = <B, W'> - lambda |W'|^2, so the errors need no Gram after the solve.
"""

from __future__ import annotations

import torch

_BLOCK = 2048  # columns of C widened to float64 at a time


def relative_error(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, w_kept: torch.Tensor) -> float:
    """||W X - W_kept X_K||^2 / ||W X||^2 from the Gram matrix; w (out, in), w_kept (out, |K|)."""
    w = w.detach().double().cpu()
    d = w.clone()
    d[:, keep] -= w_kept.detach().double().cpu()
    num = (_times(d, c, None, None) * d).sum()
    den = (_times(w, c, None, None) * w).sum()
    return float(num / den.clamp_min(1e-300))


def _times(w64: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """w64 @ C[rows][:, cols] in float64 (out, |cols|), widening C one column block at a time (None: all)."""
    cols = torch.arange(c.shape[1]) if cols is None else cols
    assert w64.shape[1] == (c.shape[0] if rows is None else rows.numel()), (w64.shape, c.shape)
    out = torch.empty(w64.shape[0], cols.numel(), dtype=torch.float64)
    for s in range(0, cols.numel(), _BLOCK):
        block = cols[s: s + _BLOCK]
        part = c.index_select(1, block.to(c.device)) if rows is None else c[rows[:, None], block[None, :]]
        out[:, s: s + _BLOCK] = w64 @ part.to(device="cpu", dtype=torch.float64)
    return out


def _solve(c_kk: torch.Tensor, wc_k: torch.Tensor, damp: float, *, overwrite: bool = False,
           prior: torch.Tensor | None = None) -> tuple[torch.Tensor, float, bool]:
    """W_new = (W C[:, K] + lambda P) (C[K,K] + lambda I)^-1 from wc_k = W C[:, K] (out, |K|) and the float64
    block c_kk: the minimiser of ||W X - W_new X_K||^2 + lambda ||W_new - P||^2, P = ``prior`` (out, |K|) or 0.
    Returns (W_new, lambda, whether the Cholesky solve succeeded). With ``overwrite`` c_kk is the caller's
    scratch copy and is damped in place (it then holds C_KK + lambda I), and wc_k, given a prior, becomes the
    right-hand side W C[:, K] + lambda P; otherwise neither is modified."""
    assert c_kk.dtype == torch.float64 and c_kk.shape == (wc_k.shape[1], wc_k.shape[1]), (c_kk.shape, wc_k.shape)
    lam = damp * float(torch.diagonal(c_kk).mean().clamp_min(1e-12))
    a = c_kk if overwrite else c_kk.clone()
    a.diagonal().add_(lam)
    if prior is not None:
        wc_k = (wc_k if overwrite else wc_k.clone()).add_(prior.to(wc_k.dtype), alpha=lam)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:  # X L L^T = B by two triangular solves (cholesky_solve would copy L column-major first)
        y = torch.linalg.solve_triangular(chol, wc_k.T, upper=False)  # (|K|, out)
        torch.linalg.solve_triangular(chol.mT, y, upper=True, out=y)  # in place: y becomes X^T
        return y.T, lam, True
    del chol
    # kept block not positive definite even after damping: least-norm solution
    return (torch.linalg.pinv(a) @ wc_k.T).T, lam, False


def _kept_block(c: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """C[K, K] as a fresh float64 (|K|, |K|) matrix (no (in, in) float64 copy on the way)."""
    return c[keep[:, None], keep[None, :]].to(device="cpu", dtype=torch.float64)


def solve_kept_weight(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The least-squares W_new (out, |K|) in float64; falls back to a pseudo-inverse if C[K,K] is singular."""
    keep = keep.to(torch.long).cpu()
    w64 = w.detach().double().cpu()
    wc_k = _times(w64, c, None, keep)
    return _solve(_kept_block(c, keep), wc_k, damp, overwrite=True)[0]


def repair(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Kept weight in w's dtype, and the relative errors of plain slicing and of the solve.

    The errors are those of relative_error(), computed from products the solve needs anyway: with
    K kept and R removed inputs, den = tr(W C W^T) = <W C[:,K], W_K> + <W C[:,R], W_R>, slicing's
    numerator is tr(W_R C_RR W_R^T), and for the damped optimum W' (C_KK + lambda I) = W C[:,K] the
    solve's numerator den - 2<W C[:,K], W'> + tr(W' C_KK W'^T) equals den - <W C[:,K], W'> - lambda |W'|^2."""
    keep = keep.to(torch.long).cpu()
    c = c.detach()
    w64 = w.detach().double().cpu()
    removed_mask = torch.ones(w64.shape[1], dtype=torch.bool)
    removed_mask[keep] = False
    removed = removed_mask.nonzero().reshape(-1)
    w_k, w_r = w64[:, keep], w64[:, removed]
    wc_k = _times(w64, c, None, keep)  # (out, |K|)
    den = (wc_k * w_k).sum() + (_times(w64, c, None, removed) * w_r).sum()
    den = den.clamp_min(1e-300)
    err_slice = float((_times(w_r, c, removed, removed) * w_r).sum() / den)
    new, lam, exact = _solve(_kept_block(c, keep), wc_k, damp, overwrite=True, prior=w_k)  # wc_k += lam W_K
    # with the right-hand side R = W C[:,K] + lam W_K: den - 2<R - lam W_K, W'> + <R, W'> - lam |W'|^2
    err_ls = float((den - (wc_k * new).sum() + lam * (2 * (w_k * new).sum() - new.pow(2).sum())) / den) \
        if exact else -1.0
    del wc_k
    if not 0.0 <= err_ls <= err_slice:  # least-norm fallback or rounding: the direct formula
        d = w64.clone()
        d[:, keep] -= new
        err_ls = float((_times(d, c, None, None) * d).sum() / den)
    if err_ls > err_slice:  # damping can, rarely, lose to slicing: never make the layer worse
        new, err_ls = w_k, err_slice
    return new.to(dtype=w.dtype, device=w.device), {"rel_error_slice": err_slice, "rel_error_lsq": err_ls}


def repair_paired(w: torch.Tensor, c_dense: torch.Tensor, cross: torch.Tensor, c_kept: torch.Tensor,
                  damp: float = 0.01, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Sequential repair: the kept weight W' minimizing ||W X - W' X'_K||^2 (+ lambda ||W' - W_K||^2 given the
    kept inputs ``keep``, else + lambda ||W'||^2).

    X are the projection's inputs in the unpruned model, X'_K the kept inputs in the model whose
    earlier layers are already pruned. c_dense = X^T X (in, in), cross = X^T X'_K (in, k),
    c_kept = X'_K^T X'_K (k, k), all float64; none is modified. W' = (W cross + lambda W_K) (c_kept + lambda I)^-1.
    """
    w64 = w.detach().double().cpu()
    den = float((_times(w64, c_dense, None, None) * w64).sum())
    prior = w64[:, keep.to(torch.long).cpu()] if keep is not None else None
    return repair_paired_products(w, w64 @ cross, c_kept.clone(), den, damp, prior)


def repair_paired_products(w: torch.Tensor, w_cross: torch.Tensor, c_kept: torch.Tensor, den: float,
                           damp: float = 0.01, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """repair_paired from the products it needs: w_cross = W X^T X'_K (out, k) float64, c_kept = X'_K^T X'_K
    (k, k) float64, both *consumed* (damped in place, the prior added in place), den = ||W X||^2; ``prior`` the
    sliced weight W_K (out, k) the damping pulls toward (None: toward 0). The error ||W X - W' X'_K||^2 / den is
    den - 2<W X^T X'_K, W'> + tr(W' c_kept W'^T), with tr(W' c_kept W'^T) = <R, W'> - lambda |W'|^2 for the
    Cholesky solution of W' A = R (A = c_kept + lambda I, R = w_cross + lambda W_K), and tr(W' A W'^T) -
    lambda |W'|^2 otherwise."""
    prior = prior.detach().double().cpu() if prior is not None else None
    new, lam, exact = _solve(c_kept, w_cross, damp, overwrite=True, prior=prior)  # c_kept holds A, w_cross R
    r_dot = float((w_cross * new).sum())
    cross_dot = r_dot - (lam * float((prior * new).sum()) if prior is not None else 0.0)  # <W X^T X'_K, W'>
    quad = r_dot if exact else float(((new @ c_kept) * new).sum())
    num = den - 2 * cross_dot + quad - lam * float(new.pow(2).sum())
    return new.to(dtype=w.dtype, device=w.device), {"rel_error_lsq": num / max(den, 1e-300)}


def residual_correction(c: torch.Tensor, cross: torch.Tensor, delta_sq: float,
                        damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Layer-drop repair's correction E (out, in) float32, to be added to the kept projection, and its errors.

    With X the projection's inputs (in) and D the dropped layers' contribution to the residual stream
    (out) over the calibration tokens, c = X^T X (in, in) float64, *consumed* (damped in place),
    cross = X^T D (in, out) and delta_sq = ||D||^2, E = cross^T (C + lambda I)^-1 minimizes
    ||E X - D||^2 + lambda ||E||^2 and does not depend on the weight (damping pulls toward the original
    weight, so E = 0 is always a candidate and the result is never worse than dropping alone). Errors are
    relative to ||D||^2: 1.0 before (nothing of D is reproduced), ||E X - D||^2 / ||D||^2 after, which with
    E A = cross^T (A = C + lambda I) is (||D||^2 - <cross^T, E> - lambda |E|^2) / ||D||^2."""
    assert c.dtype == torch.float64, c.dtype
    # (out, in) row-major, so that its transpose is the column-major right-hand side the solves take without a copy
    cross_t = cross.detach().T.to(device="cpu", dtype=torch.float64, memory_format=torch.contiguous_format)
    e, lam, exact = _solve(c, cross_t, damp, overwrite=True)  # c now holds A
    if exact:
        resid = delta_sq - float((e * cross_t).sum()) - lam * float(e.pow(2).sum())
    else:
        resid = float(((e @ c) * e).sum()) - lam * float(e.pow(2).sum()) - 2 * float((e * cross_t).sum()) + delta_sq
    err = resid / max(delta_sq, 1e-300)
    if not err <= 1.0:  # rounding on a degenerate case: keep the layer as it was
        e, err = torch.zeros_like(e), 1.0
    return e.float(), {"rel_error_drop": 1.0, "rel_error_lsq": err}


def repair_residual(w: torch.Tensor, c: torch.Tensor, cross: torch.Tensor, delta_sq: float,
                    damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Layer-drop repair of a kept projection: W + residual_correction(C, cross, ||D||^2) in w's dtype
    (c is not modified)."""
    e, err = residual_correction(c.detach().to(device="cpu", dtype=torch.float64, copy=True), cross, delta_sq, damp)
    return (w.detach().double().cpu() + e.double()).to(dtype=w.dtype, device=w.device), err


def damp_grid(damp: float) -> tuple[float, ...]:
    """The dampings a held-out choice tries: ``damp`` (a stage's reconstruct_damp), and 10, 100 and 1000 times it
    (SmolLM2-135M, 15% of MLP channels by activation, every layer at one damping: 0.01 53.82, 0.1 44.14,
    1 43.43, 10 45.00 held-out perplexity; no refit 47.94)."""
    return (damp, 10 * damp, 100 * damp, 1000 * damp)


def choose_on_held_out(slice_error: float, candidate_error, damp: float, tokens: int) -> tuple[float | str, dict]:
    """The best of plain slicing (held-out error ``slice_error``) and each damping of damp_grid(damp)
    (``candidate_error(d)``: the held-out error of the refit at d on the fitting tokens): ("slice" or the
    damping, the report entries held_out_tokens, held_out_rel_error and damp_chosen)."""
    scores = {"slice": slice_error, **{d: candidate_error(d) for d in damp_grid(damp)}}
    best = min(scores, key=scores.get)
    return best, {"held_out_tokens": tokens, "held_out_rel_error": {str(k): v for k, v in scores.items()},
                  "damp_chosen": best}


def repair_held_out(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, held: torch.Tensor,
                    damp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """One-shot repair that chooses its damping, or no refit at all, on calibration tokens it did not fit.

    c = X^T X over all calibration tokens (in, in); held = X_h (tokens_h, in), the inputs of the held-out tokens
    (also counted in c). Each damping of damp_grid(damp) is fitted on the other tokens (C_fit = C - X_h^T X_h, formed on
    the kept block only) and scored by its held-out relative error ||X_h W^T - X_hK W'^T||^2 / ||X_h W^T||^2;
    plain slicing (W_K) is scored too. The winner is refitted on all tokens with its damping (slicing stays
    slicing). With ~2,000 calibration tokens a refit of ~1,000 inputs can fit the calibration set and lose
    elsewhere; this keeps it only where it generalises to held-out tokens."""
    keep = keep.to(torch.long).cpu()
    w64 = w.detach().double().cpu()
    xh = held.detach().double().cpu()  # (tokens_h, in)
    xh_k = xh[:, keep]
    w_k = w64[:, keep]
    y_h = xh @ w64.T  # (tokens_h, out): the held-out tokens' original outputs
    den_h = float(y_h.pow(2).sum().clamp_min(1e-300))

    def held_error(w_kept: torch.Tensor) -> float:
        return float((y_h - xh_k @ w_kept.T).pow(2).sum()) / den_h

    c_fit = _kept_block(c, keep)
    c_fit.addmm_(xh_k.T, xh_k, alpha=-1.0)  # C_fit[K, K]
    wc_fit = _times(w64, c, None, keep).addmm_(y_h.T, xh_k, alpha=-1.0)  # W C_fit[:, K] (out, |K|)
    best, info = choose_on_held_out(held_error(w_k), lambda d: held_error(_solve(c_fit, wc_fit, d, prior=w_k)[0]),
                                    damp, int(xh.shape[0]))
    del c_fit, wc_fit
    if best == "slice":
        sliced = w.detach()[:, keep.to(w.device)].clone()
        err_slice = relative_error(w, c, keep, sliced)
        return sliced, {"rel_error_slice": err_slice, "rel_error_lsq": err_slice, **info}
    new, err = repair(w, c, keep, best)
    return new, {**err, **info}
