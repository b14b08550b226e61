"""Least-squares repair on hand-built layers."""

import pytest
import torch

from gqaprune.ops.reconstruct import relative_error, repair, repair_held_out, repair_residual


def test_exact_linear_combination_is_restored_exactly():
    torch.manual_seed(0)
    n, d_in, d_out = 500, 8, 5
    base = torch.randn(n, 6, dtype=torch.float64)
    # inputs 6 and 7 are exact linear combinations of inputs 0..5
    x = torch.cat([base, (base @ torch.randn(6, 2, dtype=torch.float64))], dim=1)  # (n, 8)
    w = torch.randn(d_out, d_in)
    c = x.T @ x
    keep = torch.arange(6)
    new, err = repair(w, c, keep, damp=1e-9)
    y = x.float() @ w.T
    y_repaired = x[:, keep].float() @ new.T
    y_sliced = x[:, keep].float() @ w[:, keep].T
    assert torch.allclose(y_repaired, y, atol=1e-4)
    assert not torch.allclose(y_sliced, y, atol=1e-2)
    assert err["rel_error_lsq"] < 1e-8 < err["rel_error_slice"]


def test_relative_error_matches_direct_computation():
    torch.manual_seed(1)
    x = torch.randn(200, 6, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64)
    keep = torch.tensor([0, 2, 5])
    direct = ((x @ w.T - x[:, keep] @ w[:, keep].T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert abs(relative_error(w, x.T @ x, keep, w[:, keep]) - direct) < 1e-10


def test_residual_repair_learns_an_exactly_linear_contribution():
    # the dropped contribution D = A X is linear in the kept projection's inputs: the repaired
    # weight is W + A and reproduces W X + D (up to the tiny damping)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=gen, dtype=torch.float64)  # (tokens, in)
    w = torch.randn(6, 12, generator=gen, dtype=torch.float64)  # (out, in)
    a = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    d = x @ a.T  # (tokens, out)
    new, err = repair_residual(w, x.T @ x, x.T @ d, float(d.pow(2).sum()), damp=1e-9)
    assert torch.allclose(new, w + a, atol=1e-5)
    assert err["rel_error_drop"] == 1.0 and err["rel_error_lsq"] < 1e-8


def test_residual_repair_never_worse_than_dropping_and_reports_the_true_error():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    d = torch.tanh(x[:, :8] * 3) + 0.5 * torch.randn(300, 8, generator=gen, dtype=torch.float64)  # partly linear
    new, err = repair_residual(w, x.T @ x, x.T @ d, float(d.pow(2).sum()))
    direct = float(((x @ (new - w).T) - d).pow(2).sum() / d.pow(2).sum())
    assert abs(err["rel_error_lsq"] - direct) < 1e-9
    assert 0.0 < err["rel_error_lsq"] < 1.0


def test_in_place_solve_equals_the_naive_formula():
    # W C[:, K] (C_KK + lambda I)^-1 with an explicit identity and inverse, against the damped-in-place Cholesky
    # solve, on a badly conditioned Gram (fewer tokens than inputs) given in float32 as the statistics hold it
    from gqaprune.ops.reconstruct import solve_kept_weight

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # (tokens, in), rank 40
    w = torch.randn(10, 64, generator=gen, dtype=torch.float64)
    c = x.T @ x  # float32, as gqaprune.scoring.stats accumulates it
    keep = torch.randperm(64, generator=gen)[:48].sort().values
    c64 = c.double()
    c_kk = c64[keep][:, keep]
    lam = 0.01 * float(torch.diagonal(c_kk).mean())
    naive = w @ c64[:, keep] @ torch.linalg.inv(c_kk + lam * torch.eye(48, dtype=torch.float64))
    got = solve_kept_weight(w, c, keep, damp=0.01)
    assert got.dtype == torch.float64 and got.shape == (10, 48)
    assert float((got - naive).abs().max()) < 1e-10 * float(naive.abs().max())
    # the repair's damping pulls toward the sliced weight W_K: (W C[:, K] + lambda W_K) (C_KK + lambda I)^-1
    toward_slice = (w @ c64[:, keep] + lam * w[:, keep]) @ torch.linalg.inv(c_kk + lam * torch.eye(48, dtype=torch.float64))
    new, err = repair(w, c, keep, damp=0.01)
    assert torch.allclose(new, toward_slice, atol=1e-10 * float(toward_slice.abs().max()), rtol=0)
    assert abs(err["rel_error_lsq"] - relative_error(w, c64, keep, toward_slice)) < 1e-10
    assert torch.equal(c, x.T @ x)  # the caller's Gram is left as it was


def test_paired_repair_from_products_matches_the_gram_formula():
    from gqaprune.ops.reconstruct import repair_paired

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64)  # dense inputs
    keep = torch.tensor([0, 1, 3, 4, 6, 7, 9, 10])
    xp = x[:, keep] + 0.1 * torch.randn(300, 8, generator=gen, dtype=torch.float64)  # pruned-model inputs
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    grams = (x.T @ x, x.T @ xp, xp.T @ xp)
    kept_before = grams[2].clone()
    new, err = repair_paired(w, *grams, damp=0.01)
    lam = 0.01 * float(torch.diagonal(grams[2]).mean())
    naive = w @ grams[1] @ torch.linalg.inv(grams[2] + lam * torch.eye(8, dtype=torch.float64))
    assert float((new - naive).abs().max()) < 1e-10
    direct = float((x @ w.T - xp @ new.T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert abs(err["rel_error_lsq"] - direct) < 1e-10
    assert torch.equal(grams[2], kept_before)
    # given the kept inputs, the damping pulls toward the sliced weight instead of toward 0
    new, err = repair_paired(w, *grams, damp=0.5, keep=keep)
    lam = 0.5 * float(torch.diagonal(grams[2]).mean())
    naive = (w @ grams[1] + lam * w[:, keep]) @ torch.linalg.inv(grams[2] + lam * torch.eye(8, dtype=torch.float64))
    assert float((new - naive).abs().max()) < 1e-10
    direct = float((x @ w.T - xp @ new.T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert abs(err["rel_error_lsq"] - direct) < 1e-10


def _held_out_error(x_h, w, keep, w_kept) -> float:
    y = x_h @ w.T
    return float((y - x_h[:, keep] @ w_kept.T).pow(2).sum() / y.pow(2).sum())


def test_held_out_repair_keeps_the_sliced_weight_when_a_refit_only_fits_the_calibration_tokens():
    # the removed inputs are independent of the kept ones: the best kept weight anywhere is W_K, but 40 fit tokens
    # in 48 kept dimensions let a refit reproduce them on the calibration tokens (and only there)
    torch.manual_seed(3)
    x_fit, x_h = torch.randn(40, 64, dtype=torch.float64), torch.randn(200, 64, dtype=torch.float64)
    w = torch.randn(8, 64, dtype=torch.float64)
    keep = torch.arange(48)
    c = x_fit.T @ x_fit + x_h.T @ x_h
    overfit, _ = repair(w, x_fit.T @ x_fit, keep, damp=0.01)
    assert _held_out_error(x_h, w, keep, overfit) > _held_out_error(x_h, w, keep, w[:, keep])  # the trap is real
    new, info = repair_held_out(w, c, keep, x_h)
    assert info["damp_chosen"] == "slice"
    assert torch.equal(new, w[:, keep])
    assert info["held_out_tokens"] == 200
    assert info["rel_error_lsq"] == info["rel_error_slice"] == pytest.approx(relative_error(w, c, keep, w[:, keep]))


def test_held_out_repair_refits_when_the_refit_generalises_and_scores_each_damping_on_unseen_tokens():
    torch.manual_seed(4)
    base = torch.randn(600, 12, dtype=torch.float64)
    x = torch.cat([base, base @ torch.randn(12, 4, dtype=torch.float64)], dim=1)  # 4 removed inputs, linear in the rest
    x_fit, x_h = x[:450], x[450:]
    w = torch.randn(5, 16, dtype=torch.float64)
    keep = torch.arange(12)
    new, info = repair_held_out(w, x.T @ x, keep, x_h)
    assert info["damp_chosen"] == 0.01
    assert info["held_out_rel_error"]["0.01"] < 1e-3 < info["held_out_rel_error"]["slice"]
    for damp in (0.01, 0.1, 1.0):  # each candidate was fitted on the other 450 tokens only
        fitted, _ = repair(w, x_fit.T @ x_fit, keep, damp)
        assert info["held_out_rel_error"][str(damp)] == pytest.approx(_held_out_error(x_h, w, keep, fitted), rel=1e-6)
    refit, _ = repair(w, x.T @ x, keep, 0.01)  # the winner, refitted on every token
    torch.testing.assert_close(new, refit)
