"""Least-squares repair on hand-built layers."""

import torch

from gqaprune.ops.reconstruct import relative_error, repair, repair_residual


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
