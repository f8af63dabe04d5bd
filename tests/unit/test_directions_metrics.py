"""Directions and metrics against numpy and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tunelens.directions import Direction, class_means, diff_of_means
from tunelens.errors import ShapeError
from tunelens.metrics import accuracy, auroc, auroc_rows, binomial_ci, ece, ece_rows, mean_ci
from tunelens.sites import Site

SITE = Site("resid_post", 0)


def test_diff_of_means_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 7, generator=gen)
    labels = torch.randint(0, 2, (50,), generator=gen)
    d = diff_of_means(acts, labels, site=SITE)
    a, lab = acts.numpy(), labels.numpy()
    delta = a[lab == 1].mean(0) - a[lab == 0].mean(0)
    # float32 means of ~25 values of O(1) against numpy's: rounding ~1e-7, so 1e-6 here and below
    np.testing.assert_allclose(d.vector.numpy(), delta / np.linalg.norm(delta), atol=1e-6)
    assert d.scale == pytest.approx(np.linalg.norm(delta), rel=1e-5)
    _, means = class_means(acts, labels)
    np.testing.assert_allclose(means[0].numpy(), a[lab == 0].mean(0), atol=1e-6)


def test_direction_projection_and_cosine():
    d = Direction(site=SITE, vector=torch.tensor([0.0, 2.0]))
    assert d.project(torch.tensor([[1.0, 3.0]])).tolist() == [3.0]
    assert d.cosine(torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ShapeError, match="width 2, but the activations have width 3"):
        d.project(torch.ones(1, 3))


@pytest.mark.parametrize(
    "vector, match",
    [(torch.zeros(3), "zero vector"), (torch.tensor([1.0, float("nan")]), "NaN"), (torch.ones(2, 2), "1-d")],
)
def test_bad_directions(vector, match):
    with pytest.raises(ShapeError, match=match):
        Direction(site=SITE, vector=vector)


def test_diff_of_means_needs_two_classes():
    with pytest.raises(ShapeError, match="exactly two classes, got 3"):
        diff_of_means(torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]), site=SITE)


def test_auroc_matches_sklearn_with_ties():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (300,), generator=gen).float()
    labels = torch.randint(0, 2, (300,), generator=gen)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    with pytest.raises(ShapeError, match="both classes"):
        auroc(scores, torch.zeros(300))


def test_batched_auroc_and_ece_equal_sklearn_and_the_per_row_forms():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 7, (5, 300), generator=gen).double() / 3  # many ties
    labels = torch.randint(0, 2, (300,), generator=gen)
    expected = [roc_auc_score(labels.numpy(), s.numpy()) for s in scores]
    np.testing.assert_allclose(auroc_rows(scores, labels).numpy(), expected, atol=1e-12)
    probs = torch.softmax(torch.randn(5, 300, 3, generator=gen) * 2, dim=-1)
    labels3 = torch.randint(0, 3, (300,), generator=gen)
    expected = [ece(p, labels3) for p in probs]
    np.testing.assert_allclose(ece_rows(probs, labels3).numpy(), expected, atol=1e-12)
    with pytest.raises(ShapeError, match="both classes"):
        auroc_rows(scores, torch.ones(300))
    with pytest.raises(ShapeError, match="300 scores but 299 labels"):
        ece_rows(probs, labels3[:-1])


def test_ece_matches_a_direct_loop():
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(400, 3, generator=gen) * 2, dim=1)
    labels = torch.randint(0, 3, (400,), generator=gen)
    conf, pred = probs.max(1)
    expected = 0.0
    for lo in np.linspace(0, 1, 11)[:-1]:
        m = (conf >= lo) & (conf < lo + 0.1)
        if m.any():
            expected += m.float().mean().item() * abs(
                conf[m].mean().item() - (pred[m] == labels[m]).float().mean().item()
            )
    assert ece(probs, labels) == pytest.approx(expected, abs=1e-6)
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    assert ece(one_hot, labels) == 0.0


def test_accuracy_and_intervals():
    assert accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)
    mean, lo, hi = mean_ci([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and lo < 0.6 < hi
    lo, hi = binomial_ci(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    with pytest.raises(ShapeError, match="3 scores but 2 labels"):
        accuracy(torch.ones(3), torch.ones(2))


def test_mean_ci_is_clipped_to_the_measures_range():
    mean, lo, hi = mean_ci([1.0, 1.0, 0.99], bounds=(0.0, 1.0))
    assert hi == 1.0 and lo < mean < 1.0
    assert mean_ci([1.0, 1.0, 0.99])[2] > 1.0  # without bounds: the plain normal interval


def test_bootstrap_means_against_scipy_and_by_cluster():
    """Percentile intervals of the mean against scipy's bootstrap (another RNG: Monte-Carlo tolerance);
    resampling whole clusters widens the interval when items within a cluster agree."""
    from scipy.stats import bootstrap

    from tunelens.metrics import bootstrap_means, percentile_ci

    rng = np.random.default_rng(0)
    x = rng.binomial(1, 0.6, size=200).astype(float)
    ours = percentile_ci(bootstrap_means(torch.tensor(x)[None], n_boot=20000, seed=1)[:, 0])
    ref = bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=2).confidence_interval
    assert abs(ours[0] - ref.low) < 0.01 and abs(ours[1] - ref.high) < 0.01
    # rows share the draws: the difference of two identical rows is exactly zero in every resample
    both = bootstrap_means(torch.tensor(np.stack([x, x])), n_boot=500)
    assert torch.equal(both[:, 0], both[:, 1])
    # 20 clusters of 10 identical items: as uncertain as 20 items, not 200
    cl = np.repeat(rng.binomial(1, 0.6, size=20).astype(float), 10)
    groups = [f"w{i // 10}" for i in range(200)]
    lo_c, hi_c = percentile_ci(bootstrap_means(torch.tensor(cl)[None], groups, n_boot=20000)[:, 0])
    lo_i, hi_i = percentile_ci(bootstrap_means(torch.tensor(cl)[None], n_boot=20000)[:, 0])
    ref20 = bootstrap((cl[::10],), np.mean, n_resamples=20000, method="percentile", random_state=3)
    assert abs((hi_c - lo_c) - (ref20.confidence_interval.high - ref20.confidence_interval.low)) < 0.03
    assert hi_c - lo_c > 2.5 * (hi_i - lo_i)
    with pytest.raises(ShapeError):
        bootstrap_means(torch.ones(1, 3), ["a", "b"])
