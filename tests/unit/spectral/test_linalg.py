"""The batched linear algebra against numpy on random matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral import linalg
from tunelens.errors import ConfigError, ShapeError


def decaying(batch: int, m: int, n: int, seed: int) -> torch.Tensor:
    """Random matrices with well-separated singular values 1, 0.9, 0.81, ... (stable singular vectors)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
        v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
        s = 0.9 ** np.arange(min(m, n))
        out.append((u * s) @ v.T)
    return torch.tensor(np.stack(out), dtype=torch.float32)


def assert_same_vectors(a: torch.Tensor, b: np.ndarray, atol: float) -> None:
    """Columns equal up to sign."""
    cos = np.abs(np.sum(a.numpy().astype(np.float64) * b, axis=-2))
    np.testing.assert_allclose(cos, 1.0, atol=atol)


@pytest.mark.parametrize("shape", [(12, 12), (8, 20), (30, 10)])
def test_left_basis_matches_numpy_svd(shape):
    w = decaying(3, *shape, seed=0)
    u, s = linalg.left_basis(w)
    u_np, s_np, _ = np.linalg.svd(w.numpy().astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(s.numpy(), s_np, atol=1e-5)
    assert_same_vectors(u, u_np, atol=1e-4)
    # orthonormal columns
    eye = u.mT @ u
    np.testing.assert_allclose(eye.numpy(), np.broadcast_to(np.eye(min(shape)), eye.shape), atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (40, 96), (120, 48)])
def test_top_left_matches_numpy_svd(shape):
    w = decaying(2, *shape, seed=1) + 0.01 * torch.randn(
        2, *shape, generator=torch.Generator().manual_seed(0)
    )
    u, s = linalg.top_left(w, 6, generator=torch.Generator().manual_seed(0), tol=1e-6)
    u_np, s_np, _ = np.linalg.svd(w.numpy().astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(s.numpy(), s_np[:, :6], rtol=1e-4)
    assert_same_vectors(u, u_np[..., :6], atol=1e-3)


def test_lowrank_svd_matches_numpy_of_the_product():
    gen = torch.Generator().manual_seed(2)
    b, a = torch.randn(50, 4, generator=gen), torch.randn(4, 30, generator=gen)
    u, s, v = linalg.lowrank_svd(b, a, scaling=0.5)
    prod = 0.5 * (b.double() @ a.double()).numpy()
    u_np, s_np, vt_np = np.linalg.svd(prod, full_matrices=False)
    np.testing.assert_allclose(s.numpy(), s_np[:4], rtol=1e-5)
    assert_same_vectors(u, u_np[:, :4], atol=1e-5)
    assert_same_vectors(v, vt_np[:4].T, atol=1e-5)
    np.testing.assert_allclose((u * s) @ v.T, prod, atol=1e-4)


def test_singular_values64_resolves_a_rank_one_update():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 40, 1, generator=gen), torch.randn(1, 25, 1, generator=gen)
    s = linalg.singular_values64(x @ y.mT)
    assert s[0, 0] == pytest.approx(float(x.norm() * y.norm()), rel=1e-5)
    assert float(s[0, 1:].max()) < 1e-6 * float(s[0, 0])
    assert float(linalg.effective_rank(s.double())) == pytest.approx(1.0, abs=1e-4)


def test_effective_and_stable_rank_against_formulas():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    p = np.array([3, 2, 1]) / 6
    assert float(linalg.effective_rank(s)[0]) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert float(linalg.effective_rank(s)[1]) == pytest.approx(4.0)
    assert float(linalg.effective_rank(s)[2]) == 0.0
    assert linalg.stable_rank(s).tolist() == pytest.approx([14 / 9, 4.0, 0.0])


def test_best_match_matches_brute_force():
    gen = torch.Generator().manual_seed(4)
    ut = torch.linalg.qr(torch.randn(2, 20, 3, generator=gen))[0]
    u0 = torch.linalg.qr(torch.randn(2, 20, 20, generator=gen))[0]
    values, index = linalg.best_match(ut, u0)
    for b in range(2):
        for j in range(3):
            sims = [abs(float(ut[b, :, j] @ u0[b, :, i])) for i in range(20)]
            assert float(values[b, j]) == pytest.approx(max(sims), abs=1e-6)
            assert int(index[b, j]) == int(np.argmax(sims))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ShapeError, match="stack of matrices"):
        linalg.left_basis(torch.zeros(3, 3))
    with pytest.raises(ShapeError, match="NaN"):
        linalg.left_basis(torch.full((1, 3, 3), float("nan")))
    with pytest.raises(ConfigError, match="rank bound 8"):
        linalg.top_left(torch.randn(1, 8, 20), 9)
    with pytest.raises(ShapeError, match="share"):
        linalg.best_match(torch.zeros(1, 5, 2), torch.zeros(1, 6, 6))
