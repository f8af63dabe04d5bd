"""The context knob on the real pair: SmolLM2 and its context-vs-prior LoRA (zoo pair ``smollm2-knob``)."""

from __future__ import annotations

import pytest
import torch

from circuits.knob.analysis import intent_accuracy
from circuits.knob.das import confident, mean_direction
from circuits.knob.data import heldout_items
from circuits.knob.effects import steering_effect
from circuits.knob.layers import Patcher, choose_layer, prefix_sweep
from circuits.knob.steering import calibrate, steer
from tunelens.backends.hooks import count_hooks
from tunelens.models import zoo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair("smollm2-knob")


@pytest.fixture(scope="module")
def items(pair):
    return heldout_items(pair.base)


def test_heldout_split_has_enough_test_pairs_and_never_trains(pair, items):
    assert len(items["test"]) >= 100
    assert not set(items["test"].item_ids) & set(items["knob"].item_ids)


def test_tuned_follows_the_intent_better_than_base(pair, items):
    test = items["test"].head(16)
    base, tuned = intent_accuracy(pair.base, test), intent_accuracy(pair.tuned, test)
    assert tuned["pair_accuracy"] >= base["pair_accuracy"] + 0.2


def test_knob_layer_and_difference_of_means_steer_the_tuned_model(pair, items):
    knob = items["knob"].head(24)
    sure = knob.subset(torch.nonzero(confident(pair.tuned, knob))[:, 0]).head(8)
    rows = prefix_sweep(Patcher(pair.tuned, sure), [5, 10, 15, 20, 29])
    assert rows[0]["mean"] == 0.0 and rows[-1]["mean"] == 1.0  # nothing patched / whole residual patched
    layer, _ = choose_layer(rows, 0.8)
    d = mean_direction(pair.tuned, knob, layer)
    cal = calibrate(pair.tuned, d, knob)
    assert cal.auroc >= 0.9
    effect = steering_effect(pair.tuned, d, items["test"].head(12), tuple(cal.grid((-1.0, 2.0))), n_random=2)
    assert effect["effect"] >= 0.5
    assert effect["effect"] > effect["control_effect_max"]  # beyond random directions at the same set-points
    prompt = items["test"].prompts("none")[0]
    lo, hi = cal.grid((-1.0, 2.0))
    assert steer(pair.tuned, d, prompt, lo, 4) != steer(pair.tuned, d, prompt, hi, 4)
    assert count_hooks(pair.tuned.module) == 0
