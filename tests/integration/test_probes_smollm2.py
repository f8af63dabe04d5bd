"""Probe studies on the real SmolLM2 pair (smollm2-et: base and its entity-tracking LoRA), small sizes."""

import pytest
import torch

from probes import ProbeConfig, ProbeResult
from probes.studies import EntityTrackingSettings, entity_tracking_study
from probes.studies.capture import capture_last
from tunelens.models import zoo
from tunelens.tasks import entity_tracking as et

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair("smollm2-et")


def test_greedy_token_from_the_captured_residual_is_the_models_own(pair):
    data = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=3), seed=5)
    acts, top = capture_last(pair, data)
    assert acts["base"].shape == (30, 9, 576)
    enc = data.encode(pair.tokenizer)
    for role, model in pair:
        logits = model.logits(enc.tokens)
        ref = logits[torch.arange(len(data)), enc.tokens.last].argmax(-1)
        assert torch.equal(top[role], ref), role


def test_entity_tracking_probe_finds_the_queried_object_in_the_tuned_model(pair, tmp_path):
    probe = ProbeConfig(test_fraction=0.5, min_test_items=60)
    res = entity_tracking_study(pair, EntityTrackingSettings(n_contexts=40, probe=probe))
    assert res.notes["model_accuracy_greedy"]["tuned"] > 0.9  # the fine-tune solves the task
    majority = float(res.chance.mean())
    best = res.best_layer("tuned")
    acc = float(res.curve("tuned")[res.layers.index(best)])
    assert acc > max(3 * majority, 0.3), (acc, majority)
    assert acc > float(res.curve("tuned", "shuffled")[res.layers.index(best)]) + 0.15
    back = ProbeResult.load(res.save(tmp_path / "et"))
    assert back.summary() == res.summary()
    assert len(back.figure().data) >= 4 and len(back.figure("transfer").data) == 5
