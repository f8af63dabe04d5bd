"""The standardiser against scikit-learn's StandardScaler and a float64 reference."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

from probes.standardise import Standardiser


def _acts() -> torch.Tensor:
    """Residual-like activations: large per-feature offsets (a float32 one-pass variance would lose
    them), one constant feature."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, 16, generator=g) * 2 + torch.randn(3, 1, 16, generator=g) * 300
    x[:, :, 5] = 7.0
    return x


def test_fit_matches_sklearn_standard_scaler():
    x = _acts()
    st = Standardiser.fit(x.double())
    for layer in range(3):
        sk = StandardScaler().fit(x[layer].double().numpy())
        np.testing.assert_allclose(st.mean[layer].numpy(), sk.mean_, rtol=1e-12)
        np.testing.assert_allclose(st.scale[layer].numpy(), sk.scale_, rtol=1e-12)
    assert st.scale[:, 5].eq(1).all()  # a constant feature keeps scale 1, as in sklearn


def test_fit_apply_equals_fit_then_apply_in_float32():
    x = _acts()
    ref = Standardiser.fit(x.double())
    expected = ref.apply(x.double())
    st, xs = Standardiser.fit_apply(x)
    assert xs.dtype == torch.float32 and not torch.equal(x, xs)  # x untouched, a new tensor returned
    torch.testing.assert_close(st.mean, ref.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(st.scale, ref.scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(xs.double(), expected, rtol=0, atol=1e-4)
    # in place: the same numbers, written into x
    y = x.clone()
    st2, ys = Standardiser.fit_apply(y, inplace=True)
    assert ys.data_ptr() == y.data_ptr()
    torch.testing.assert_close(ys, xs, rtol=0, atol=0)  # the same passes in the same order: bit-identical
    torch.testing.assert_close(st2.scale, st.scale, rtol=0, atol=0)


def test_fit_apply_keeps_constant_features_at_scale_one():
    x = _acts()
    st, xs = Standardiser.fit_apply(x)
    assert st.scale[:, 5].eq(1).all()
    assert xs[:, :, 5].abs().max() == 0
