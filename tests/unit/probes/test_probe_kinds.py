"""Difference-of-means probes against numpy, ridge probes against scikit-learn Ridge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probe_toys import make_toy
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from probes import ProbeConfig, fit_probes
from probes.split import split_indices
from tunelens.errors import ConfigError


def test_diff_means_probe_matches_numpy():
    x, y, items = make_toy(n=400, d=8, noise=1.5)
    cfg = ProbeConfig(kind="diff_means", min_test_items=20, control=False, shuffled=False)
    res = fit_probes({"base": x}, y, items, cfg, layers=[7, 8, 9])
    tr, te = split_indices(items, test_fraction=0.3, seed=0)
    for li, layer in enumerate((7, 8, 9)):
        xt, yt = x[li, tr].double().numpy(), y[tr].numpy()
        m0, m1 = xt[yt == 0].mean(0), xt[yt == 1].mean(0)
        u = (m1 - m0) / np.linalg.norm(m1 - m0)
        thr = 0.5 * (xt[yt == 0] @ u).mean() + 0.5 * (xt[yt == 1] @ u).mean()
        pred = (x[li, te].double().numpy() @ u > thr).astype(int)
        assert res.scores["task"][0, 0, li].item() == pytest.approx((pred == y[te].numpy()).mean(), abs=1e-9)
        d = res.direction("base", layer)
        np.testing.assert_allclose(d.vector.numpy(), u, atol=1e-5)
        assert str(d.site) == f"resid_post.{layer}"
    assert res.scores["task"][0, 0, 1] > 0.9 > res.scores["task"][0, 0, 0]


def test_diff_means_refuses_three_classes():
    x, y, items = make_toy(n=200, n_classes=3)
    with pytest.raises(ConfigError, match="binary"):
        fit_probes({"base": x}, y, items, ProbeConfig(kind="diff_means", min_test_items=20))


def test_ridge_probe_matches_sklearn_ridge():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 300, 6, generator=g) * torch.tensor([1.0, 5, 0.2, 1, 1, 3]) + 2
    target = x[1] @ torch.tensor([1.0, -0.5, 2.0, 0.0, 0.3, 0.1]) + 0.5 * torch.randn(300, generator=g)
    items = [str(i) for i in range(300)]
    cfg = ProbeConfig(
        kind="ridge", alpha=3.0, min_test_items=20, control=True, shuffled=True, precision="float64"
    )
    res = fit_probes({"base": x}, target, items, cfg)
    assert res.metric == "r2"
    tr, te = split_indices(items, test_fraction=0.3, seed=0)
    for li in range(2):
        sc = StandardScaler().fit(x[li, tr].double().numpy())
        ref = Ridge(alpha=3.0).fit(sc.transform(x[li, tr].double().numpy()), target[tr].double().numpy())
        r2 = ref.score(sc.transform(x[li, te].double().numpy()), target[te].double().numpy())
        assert res.scores["task"][0, 0, li].item() == pytest.approx(r2, abs=1e-6)
        np.testing.assert_allclose(
            res.weight[0, li, :, 0].numpy(), ref.coef_ / sc.scale_, rtol=1e-4, atol=1e-6
        )
    assert res.scores["task"][0, 0, 1] > 0.8 and res.scores["shuffled"][0, 0, 1] < 0.1
