"""Grafting finds where a skill lives: a known answer on a tiny model, and a cut that never follows the
order of the parameters.

The pair: ``T`` is the knob toy (tests/unit/circuits/knob_toy.py), trained to answer from memory or from
the context. The *base* is ``T`` with its layers 1-2 reset to their initial weights (the skill erased
there); the *tuned* model is ``T`` with noise (half each matrix's spread) added to layer 0. So the update
τ carries the skill in layers 1-2 and only harm in layer 0, which comes first in parameter order.

Before the margin ranking, the mask at s = 1 % put 94 % of its coordinates in layer 0 (the first
saturated coordinates in parameter order) and recovered no more than top-|τ|.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectral.graft import GraftConfig, cut_top, graft, round_mask
from tests.unit.circuits.knob_toy import toy_items, train_toy
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.models.tiny import TinyConfig, tiny_llama
from tunelens.tasks.base import Dataset, Example
from tunelens.threads import one_thread
from tunelens.weights import trainable_params

LATE = (1, 2)


def _toy_dataset(items) -> Dataset:
    examples = []
    for i, item in enumerate(items.item_ids):
        prior, context = items.answers[i]
        for fmt, answer in (("prior", prior), ("context", context)):
            examples.append(
                Example(
                    prompt=items.prompts(fmt)[i],
                    answer=" " + answer,
                    candidates=(" " + prior, " " + context),
                    item_id=item,
                )
            )
    return Dataset(task="toy_knob", config={"items": len(items)}, examples=tuple(examples))


def _late(name: str) -> bool:
    return any(f".layers.{layer}." in name for layer in LATE)


@pytest.fixture(scope="module")
def skill_pair(tiny_tok) -> ModelPair:
    with one_thread():  # speed only: the test asserts over two sparsities with wide margins
        trained = train_toy(tiny_tok)
    init = tiny_llama(
        TinyConfig(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2), len(tiny_tok.get_vocab()), 0
    )
    base, tuned = copy.deepcopy(trained.module), copy.deepcopy(trained.module)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        b, t, i = trainable_params(base), trainable_params(tuned), trainable_params(init)
        for name in b:
            if _late(name):
                b[name].copy_(i[name])  # train_toy starts from these weights: the late skill erased
            else:
                t[name].add_(0.5 * t[name].std() * torch.randn(t[name].shape, generator=gen))

    def loaded(module, name):
        return LoadedModel(module, tiny_tok, source=ModelSource(kind="memory", location=name), name=name)

    return ModelPair(loaded(base, "skill-base"), loaded(tuned, "skill-tuned"))


@pytest.fixture(scope="module")
def result(skill_pair, tiny_tok):
    data = _toy_dataset(toy_items(96, 3, tiny_tok)).split({"train": 0.5, "test": 0.5}, seed=0)
    cfg = GraftConfig(sparsities=(0.01, 0.02), steps=4, max_fit=96, max_dev=32)
    with one_thread():
        return graft(skill_pair, {"toy": data}, cfg)


def test_the_mask_lies_where_the_skill_is(result):
    """Measured: 72-78 % of the mask in layers 1-2 at s = 1 %, 83-88 % at 2 % (default and MKL AVX2 paths),
    against 6 % at 1 % before the fix; top-|τ| puts all of its mask there too but recovers 6-19 % of the gain
    to the graft's 30-63 %."""
    lm = result.layer_map
    for s, part in lm.groupby("sparsity"):
        share = part[part.layer.isin(LATE)].n_grafted.sum() / part.n_grafted.sum()
        assert share >= 0.5, (s, share, part)
    # the figure draws the same map
    fig = result.figure("layers")
    drawn = {int(x): 0 for x in lm.layer}
    for trace in fig.data:
        for x, y in zip(trace.x, trace.y, strict=True):
            drawn[int(x)] += int(y)
    assert drawn == {int(k): int(v) for k, v in lm.groupby("layer").n_grafted.sum().items()}
    curve = result.curve.set_index(["method", "sparsity"])
    for s in (0.01, 0.02):
        assert curve.loc[("graft", s), "recovered"] >= 0.25
        assert curve.loc[("graft", s), "accuracy"] > curve.loc[("random", s), "accuracy"]


def test_the_relaxation_does_not_saturate_and_the_history_says_so(result):
    h = result.history
    assert {"saturated", "saturated_in_mask", "ties_at_cut", "lr", "selection"} <= set(h.columns)
    early = h[h.step.isin((1, 2))]
    # the coordinates the cut ranks have not saturated (a rate fixed at the first step saturated most)
    assert (early.saturated_in_mask < 0.5).all(), early
    assert (h[h.step > 0].lr > 0).all()
    assert result.figure("steps").data  # selection and saturation against steps


def test_mask_training_leaves_the_base_model_without_gradients(skill_pair, result):
    assert all(p.grad is None for p in skill_pair.base.module.parameters())


def test_saturated_scores_are_cut_by_margin_and_ties_at_random_never_by_position():
    """γ = σ(S − b) rounds to 1.0 for every S − b > 17: ranked by γ, these all tie and ``topk`` kept the
    first in parameter order. The margin ranks them; exact ties are broken by a seeded random order."""
    n = 1000
    scores = {"a": torch.full((n,), 50.0), "b": torch.linspace(40.0, 60.0, n)}  # all saturated, γ = 1.0
    gb = {k: torch.zeros(n, dtype=torch.bool) for k in scores}
    mask, ties = round_mask(scores, gb, 10.0, 500)
    assert torch.sigmoid(torch.tensor(40.0 - 10.0)) == 1.0  # the premise: γ itself cannot tell them apart
    # the margin keeps b's 500 largest (its scores above 50 beat a's tie at 50), none of a's
    assert int(mask["b"].sum()) == 500 and bool(mask["b"][500:].all()) and not mask["a"].any()
    assert ties == 0
    # all tied: the kept coordinates are spread over the order, not its start
    flat, ties = cut_top({"x": torch.ones(2000)}, 100, torch.Generator().manual_seed(0))
    kept = flat["x"].nonzero().flatten()
    assert ties == 2000 and len(kept) == 100
    assert kept.max() > 1000 and kept.min() < 1000  # not all before the dropped ones
    again, _ = cut_top({"x": torch.ones(2000)}, 100, torch.Generator().manual_seed(0))
    assert torch.equal(again["x"], flat["x"])  # seeded: reproducible
    other, _ = cut_top({"x": torch.ones(2000)}, 100, torch.Generator().manual_seed(1))
    assert not torch.equal(other["x"], flat["x"])


def test_accuracies_and_differences_carry_intervals_over_items(result, tiny_tok):
    data = _toy_dataset(toy_items(96, 3, tiny_tok)).split({"train": 0.5, "test": 0.5}, seed=0)
    n_groups = len({e.item_id for e in data["test"]})
    curve = result.curve.set_index(["method", "sparsity"])
    assert (
        (curve.accuracy_lo <= curve.accuracy + 1e-12) & (curve.accuracy <= curve.accuracy_hi + 1e-12)
    ).all()
    cmp = result.comparisons
    assert set(cmp.comparison) == {"graft - top_abs", "graft - random", "top_abs - random"}
    for r in cmp.itertuples():
        a, b = r.comparison.split(" - ")
        assert r.difference == pytest.approx(
            curve.loc[(a, r.sparsity), "accuracy"] - curve.loc[(b, r.sparsity), "accuracy"], abs=1e-12
        )
        assert r.lo <= r.difference <= r.hi and r.n_groups == n_groups and r.n_items == len(data["test"])
        assert r.separated == (r.lo > 0 or r.hi < 0)
    s = result.summary()
    assert "ci" in s["graft - random@0.01[toy]"] and "accuracy_ci" in s["graft@0.01[toy]"]
