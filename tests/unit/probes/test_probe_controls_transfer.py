"""Controls and transfer on toys whose answers are known by construction."""

from __future__ import annotations

import pytest
import torch
from probe_toys import make_toy

from probes import ProbeConfig, fit_probes
from probes.controls import control_labels


def test_control_labels_are_consistent_per_type_and_seeded():
    types = [f"t{i % 7}" for i in range(70)]
    y = torch.arange(70) % 3
    a = control_labels(types, y, seed=4)
    assert all(a[i] == a[i % 7] for i in range(70))
    assert torch.equal(a, control_labels(types, y, seed=4))
    assert set(a.tolist()) <= {0, 1, 2}


def test_control_is_chance_when_types_are_invisible_and_selectivity_is_the_gap():
    x, y, items = make_toy(n=800, d=16, noise=1.0)
    types = [f"type{i % 40}" for i in range(800)]  # recur across items, not encoded in x
    res = fit_probes({"base": x}, y, items, ProbeConfig(min_test_items=20, n_seeds=3), types=types)
    task, control = res.scores["task"][0].mean(0), res.scores["control"][0].mean(0)
    assert task[1] > 0.95
    assert abs(control[1] - 0.5) < 0.1 and abs(res.scores["shuffled"][0].mean(0)[1] - 0.5) < 0.1
    torch.testing.assert_close(res.scores["selectivity"], res.scores["task"] - res.scores["control"])
    assert res.scores["selectivity"][0, :, 1].mean() > 0.35


def test_control_bites_when_the_representation_encodes_the_type():
    """If x carries the type's identity, a probe can memorise the control labels: selectivity drops."""
    n, d = 800, 32
    g = torch.Generator().manual_seed(5)
    types = [f"type{i % 10}" for i in range(n)]
    emb = 3 * torch.randn(10, d, generator=g)
    x = torch.randn(1, n, d, generator=g) + emb[torch.arange(n) % 10]
    y = (torch.arange(n) % 10 < 5).long()  # the task itself is a function of the type
    items = [f"item{i}" for i in range(n)]
    res = fit_probes({"base": x}, y, items, ProbeConfig(min_test_items=20, n_seeds=3), types=types)
    assert res.scores["task"][0].mean() > 0.95
    assert res.scores["control"][0].mean() > 0.9
    assert res.scores["selectivity"][0].mean() < 0.1


@pytest.mark.parametrize("rule", ["target", "source"])
def test_identical_models_transfer_equals_in_model_accuracy_and_cosine_is_one(rule):
    x, y, items = make_toy(n=400)
    cfg = ProbeConfig(min_test_items=20, transfer_standardise=rule, control=False, shuffled=False)
    res = fit_probes({"base": x, "tuned": x.clone()}, y, items, cfg)
    torch.testing.assert_close(res.transfer["base->tuned"], res.scores["task"][1])
    torch.testing.assert_close(res.transfer["tuned->base"], res.scores["task"][0])
    # a float32 cosine of a vector with itself: 1 to a few float32 epsilons
    torch.testing.assert_close(res.cosine, torch.ones_like(res.cosine), atol=1e-6, rtol=0)


def test_rotated_copy_has_orthogonal_directions_and_transfer_falls_to_chance():
    """The tuned model holds the same information rotated into other coordinates (an orthogonal map that
    moves the label's subspace onto directions where the base model carries only noise)."""
    g = torch.Generator().manual_seed(9)
    n, d = 800, 32
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(1, n, d, generator=g)
    x[0, :, :4] += 2.0 * torch.randn(2, 4, generator=g)[y]  # the label lives in dims 0-3 only
    perm = torch.cat([torch.arange(16, 32), torch.arange(16)])
    q = torch.eye(d)[perm]  # orthogonal: dims 0-15 go to 16-31 and back
    tuned = x @ q
    items = [f"item{i}" for i in range(n)]
    res = fit_probes({"base": x, "tuned": tuned}, y, items, ProbeConfig(min_test_items=20, control=False))
    assert res.scores["task"][:, 0, 0].min() > 0.9  # both models decode the label in-model
    assert abs(float(res.cosine[0, 0])) < 0.15
    for key in ("base->tuned", "tuned->base"):
        assert abs(float(res.transfer[key][0, 0]) - 0.5) < 0.1
    # the probe follows the rotation: the tuned direction is the rotated base direction
    wb, wt = res.weight[0, 0, :, 0], res.weight[1, 0, :, 0]
    assert torch.nn.functional.cosine_similarity(wb @ q, wt, dim=0) > 0.99


def test_per_role_labels_transfer_scores_against_the_target_labels():
    x, y, items = make_toy(n=400)
    flipped = 1 - y  # the tuned model's labels are the opposite of the base model's
    res = fit_probes(
        {"base": x, "tuned": x},
        {"base": y, "tuned": flipped},
        items,
        ProbeConfig(min_test_items=20, control=False, shuffled=False),
    )
    assert res.scores["task"][:, 0, 1].min() > 0.95
    assert float(res.transfer["base->tuned"][0, 1]) < 0.05  # the base probe is exactly wrong on tuned labels
    assert float(res.cosine[0, 1]) < -0.99
