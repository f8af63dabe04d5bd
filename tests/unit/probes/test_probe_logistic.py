"""The batched logistic probe against scikit-learn LogisticRegression, layer by layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probe_toys import make_toy
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from probes import ProbeConfig, fit_probes
from probes.lbfgs import minimize
from probes.logistic import LogisticObjective, fit_logistic
from probes.split import split_indices


def _sklearn(x, y, C):
    return LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(x, y)


@pytest.mark.parametrize(("n_classes", "solver"), [(2, "newton"), (2, "lbfgs"), (4, "lbfgs")])
def test_fit_logistic_matches_sklearn_coefficients(n_classes, solver):
    x, y, _ = make_toy(n=400, d=12, n_layer=3, n_classes=n_classes, noise=2.0)
    xs = torch.stack(
        [torch.from_numpy(StandardScaler().fit_transform(x[i].double().numpy())) for i in range(3)]
    )
    fit = fit_logistic(xs, y, n_classes=n_classes, C=0.3, tol=1e-9, max_iter=5000, solver=solver)
    assert fit.converged.all()
    obj = LogisticObjective(
        xs.double(), y[None, None].expand(3, 1, -1), 1 if n_classes == 2 else n_classes, 0.3
    )
    ours = obj.value(torch.cat([fit.weight.flatten(1), fit.bias], 1))
    for layer in range(3):
        ref = _sklearn(xs[layer].numpy(), y.numpy(), 0.3)
        theirs = torch.cat([torch.from_numpy(ref.coef_.T).flatten(), torch.from_numpy(ref.intercept_)])
        # the same optimum: equal objective values, coefficients equal up to the flatness of the optimum
        assert float(ours[layer]) == pytest.approx(
            float(obj.value(theirs[None].expand(3, -1))[layer]), rel=1e-12
        )
        np.testing.assert_allclose(fit.weight[layer].numpy(), ref.coef_.T, atol=1e-4)
        np.testing.assert_allclose(fit.bias[layer].numpy(), ref.intercept_, atol=1e-4)


@pytest.mark.parametrize(("n_classes", "solver"), [(2, "newton"), (2, "lbfgs"), (3, "lbfgs")])
def test_fit_probes_agrees_with_sklearn_on_the_same_split(n_classes, solver):
    x, y, items = make_toy(n=500, d=10, n_layer=3, n_classes=n_classes, noise=2.5)
    cfg = ProbeConfig(
        C=0.5,
        tol=1e-9,
        max_iter=5000,
        min_test_items=20,
        control=False,
        shuffled=False,
        precision="float64",
        solver=solver,
    )
    res = fit_probes({"base": x}, y, items, cfg)
    tr, te = split_indices(items, test_fraction=cfg.test_fraction, seed=cfg.seed)
    for li in range(3):
        scaler = StandardScaler().fit(x[li, tr].double().numpy())
        ref = _sklearn(scaler.transform(x[li, tr].double().numpy()), y[tr].numpy(), 0.5)
        pred = ref.predict(scaler.transform(x[li, te].double().numpy()))
        acc = float((pred == y[te].numpy()).mean())
        assert res.scores["task"][0, 0, li].item() == pytest.approx(acc, abs=1e-12)
        # raw-space weights are sklearn's standardised-space weights divided by the scale
        w_raw = ref.coef_.T / scaler.scale_[:, None]
        np.testing.assert_allclose(res.weight[0, li].double().numpy(), w_raw, rtol=1e-3, atol=1e-5)
        # the decisions of the raw-space probe are sklearn's decisions on the standardised data
        z = x[li, te].double() @ res.weight[0, li].double() + res.bias[0, li].double()
        ours = (z[:, 0] > 0).long() if n_classes == 2 else z.argmax(-1)
        assert (ours.numpy() == pred).mean() == 1.0


def test_lbfgs_solves_independent_quadratics_with_different_curvature():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 6, 6, generator=g, dtype=torch.float64)
    h = a @ a.transpose(1, 2) + torch.diag_embed(torch.logspace(-2, 2, 6, dtype=torch.float64)).expand(
        5, 6, 6
    )
    c = torch.randn(5, 6, generator=g, dtype=torch.float64)

    def fun(x):
        hx = torch.einsum("pij,pj->pi", h, x)
        return 0.5 * (x * hx).sum(-1) - (c * x).sum(-1), hx - c

    out = minimize(fun, torch.zeros(5, 6, dtype=torch.float64), tol=1e-8, max_iter=1000)
    assert out.converged.all()
    torch.testing.assert_close(out.x, torch.linalg.solve(h, c), atol=1e-8, rtol=1e-8)


def test_fit_probes_is_deterministic():
    x, y, items = make_toy(n=300)
    cfg = ProbeConfig(min_test_items=20, n_seeds=2)
    a = fit_probes({"base": x, "tuned": x * 1.1}, y, items, cfg)
    b = fit_probes({"base": x, "tuned": x * 1.1}, y, items, cfg)
    # bit-identical on purpose: the same process, inputs, kernels and thread count; each layer is solved
    # whole by one thread, so nothing depends on scheduling
    for k in a.scores:
        torch.testing.assert_close(a.scores[k], b.scores[k], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_default_float32_probes_make_sklearns_decisions():
    """The default (float32 products, scikit-learn's tol) on a 3-class toy: the decisions of sklearn."""
    x, y, items = make_toy(n=600, d=24, n_layer=4, n_classes=3, noise=3.0)
    res = fit_probes({"base": x}, y, items, ProbeConfig(min_test_items=20, control=False, shuffled=False))
    tr, te = split_indices(items, test_fraction=0.3, seed=0)
    for li in range(4):
        scaler = StandardScaler().fit(x[li, tr].double().numpy())
        ref = LogisticRegression().fit(scaler.transform(x[li, tr].double().numpy()), y[tr].numpy())
        pred = ref.predict(scaler.transform(x[li, te].double().numpy()))
        z = x[li, te].double() @ res.weight[0, li].double() + res.bias[0, li].double()
        assert (z.argmax(-1).numpy() == pred).mean() >= 0.99
        acc = float((pred == y[te].numpy()).mean())
        assert abs(res.scores["task"][0, 0, li].item() - acc) <= 0.01


def test_newton_and_lbfgs_reach_the_same_probes_with_controls():
    x, y, items = make_toy(n=500, d=40, n_layer=3, noise=3.0)
    kw = dict(min_test_items=20, tol=1e-8, max_iter=3000, precision="float64")
    a = fit_probes({"base": x, "tuned": x + 0.3}, y, items, ProbeConfig(solver="newton", **kw))
    b = fit_probes({"base": x, "tuned": x + 0.3}, y, items, ProbeConfig(solver="lbfgs", **kw))
    torch.testing.assert_close(a.weight, b.weight, atol=1e-4, rtol=1e-3)
    for k in ("task", "control", "shuffled"):
        torch.testing.assert_close(a.scores[k], b.scores[k], atol=0.01, rtol=0)


def test_lbfgs_with_fewer_examples_than_dimensions_matches_sklearn():
    """n < d: the fit runs in the span of the examples; the coefficients are still sklearn's."""
    x, y, _ = make_toy(n=90, d=150, n_layer=2, n_classes=3, noise=2.0)
    xs = torch.stack(
        [torch.from_numpy(StandardScaler().fit_transform(x[i].double().numpy())) for i in range(2)]
    )
    fit = fit_logistic(xs, y, n_classes=3, C=0.1, tol=1e-9, max_iter=5000, solver="lbfgs")
    for layer in range(2):
        ref = _sklearn(xs[layer].numpy(), y.numpy(), 0.1)
        np.testing.assert_allclose(fit.weight[layer].numpy(), ref.coef_.T, atol=1e-4)
        np.testing.assert_allclose(fit.bias[layer].numpy(), ref.intercept_, atol=1e-4)


def _residual_like(n=400, d=48, n_layer=2, k=3, seed=3):
    """Standardised activations with a residual stream's conditioning: a few shared directions carry
    most of the variance (feature correlations near 1), and the classes are nearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    shared = torch.randn(n_layer, n, 4, generator=g, dtype=torch.float64) * 30.0
    mix = torch.randn(n_layer, 4, d, generator=g, dtype=torch.float64)
    x = shared @ mix + torch.randn(n_layer, n, d, generator=g, dtype=torch.float64)
    x = x + 1.5 * torch.randn(k, d, generator=g, dtype=torch.float64)[y]
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True, correction=0)
    return x, y


def test_curvature_preconditioner_is_the_inverse_of_the_stated_bound():
    from probes.logistic import curvature_preconditioner

    x, _ = _residual_like(n=50, d=7, n_layer=2)
    n_target, k, C = 2, 3, 0.7
    apply = curvature_preconditioner(x, n_target, k, C)
    q = torch.randn(3, 2 * n_target, 7 * k + k, dtype=torch.float64)
    out = apply(q)
    for layer in range(2):
        xl = x[layer].numpy()
        m = 0.5 * xl.T @ xl / 50 + np.eye(7) / (C * 50)  # softmax bound ½·XᵀX/n + λI
        for t in range(n_target):
            row = q[:, layer * n_target + t]
            w = row[:, : 7 * k].reshape(3, 7, k).numpy()
            want = np.stack([np.linalg.solve(m, w[i]) for i in range(3)]).reshape(3, -1)
            np.testing.assert_allclose(out[:, layer * n_target + t, : 7 * k].numpy(), want, rtol=1e-10)
            np.testing.assert_allclose(out[:, layer * n_target + t, 7 * k :].numpy(), row[:, 7 * k :] / 0.5)


def test_preconditioning_reaches_sklearns_optimum_in_far_fewer_iterations():
    """On residual-like conditioning plain L-BFGS needs hundreds of iterations; with the curvature
    bound as its initial inverse Hessian it needs tens, and both stop at sklearn's optimum."""
    x, y = _residual_like()
    fit = fit_logistic(x, y, n_classes=3, C=1.0, tol=1e-6, max_iter=5000, solver="lbfgs")
    obj = LogisticObjective(x, y[None, None].expand(2, 1, -1), 3, 1.0)
    plain = minimize(obj, torch.zeros(2, x.shape[2] * 3 + 3, dtype=torch.float64), tol=1e-6, max_iter=5000)
    assert fit.converged.all() and plain.converged.all()
    assert int(fit.n_iter.max()) * 4 < int(plain.n_iter.min())
    for layer in range(2):
        ref = _sklearn(x[layer].numpy(), y.numpy(), 1.0)
        np.testing.assert_allclose(fit.weight[layer].numpy(), ref.coef_.T, atol=1e-3)
        np.testing.assert_allclose(fit.bias[layer].numpy(), ref.intercept_, atol=1e-3)


def test_float32_newton_reaches_the_float64_optimum():
    """Newton with float32 products and factorisations stops at the same optimum (float64 iterates)."""
    x, y, _ = make_toy(n=400, d=30, n_layer=3, noise=2.0)
    xs = torch.stack(
        [torch.from_numpy(StandardScaler().fit_transform(x[i].double().numpy())) for i in range(3)]
    )
    a = fit_logistic(xs, y, n_classes=2, C=1.0, tol=1e-7, solver="newton")
    b = fit_logistic(xs.float(), y, n_classes=2, C=1.0, tol=1e-7, solver="newton")
    assert a.converged.all() and b.converged.all()
    torch.testing.assert_close(b.weight, a.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.bias, a.bias, atol=1e-5, rtol=1e-4)


def test_float32_newton_that_stalls_is_finished_in_float64():
    """Weak regularisation with more examples than dimensions: float32 factorisations of the nearly
    singular Newton system stall the iteration; those layers are solved again in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 60, 4, generator=g, dtype=torch.float64)
    y = (x[:, :, 0] + torch.randn(2, 60, generator=g, dtype=torch.float64) > 0).long()
    a = fit_logistic(x, y[:, None], n_classes=2, C=1e6, tol=1e-6, solver="newton")
    b = fit_logistic(x.float(), y[:, None], n_classes=2, C=1e6, tol=1e-6, solver="newton")
    assert a.converged.all() and b.converged.all()
    torch.testing.assert_close(b.weight, a.weight, atol=1e-5, rtol=1e-5)
    for layer in range(2):  # and it is sklearn's optimum
        ref = _sklearn(x[layer].numpy(), y[layer].numpy(), 1e6)
        np.testing.assert_allclose(b.weight[layer, 0].numpy(), ref.coef_.T, rtol=1e-3, atol=1e-3)


def test_newton_in_threads_equals_one_thread_and_restores_the_thread_count():
    """With T torch threads the layers are solved by T Python threads (one torch thread each); the
    probes equal a one-thread fit, whatever the chunking, and torch's thread count is restored."""
    x, y, _ = make_toy(n=300, d=40, n_layer=7, noise=2.0)
    xs = torch.stack([torch.from_numpy(StandardScaler().fit_transform(x[i].numpy())) for i in range(7)])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fit_logistic(xs.float(), y, n_classes=2, C=1.0, solver="newton")
        torch.set_num_threads(2)
        two = fit_logistic(xs.float(), y, n_classes=2, C=1.0, solver="newton")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert one.converged.all() and two.converged.all()
    # each layer is solved whole by one torch thread either way, so the same kernels run on the same
    # numbers: equal to float32 rounding (the weights are O(1) on standardised data), at most
    torch.testing.assert_close(two.weight, one.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two.bias, one.bias, atol=1e-6, rtol=1e-6)
