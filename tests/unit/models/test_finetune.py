import copy

import pytest
import torch

from tests.conftest import ET_PROMPTS
from tunelens.errors import ConfigError
from tunelens.models.finetune import FinetuneConfig, finetune
from tunelens.readout import answer_accuracy, last_logits
from tunelens.tasks import entity_tracking as et


def test_last_logits_equal_the_full_forward(arch_model):
    batch = arch_model.encode(ET_PROMPTS)
    full = arch_model.logits(batch)[torch.arange(len(batch)), batch.last]
    with torch.no_grad():  # the unembedding of the last rows alone blocks its matmul differently
        got = last_logits(arch_model.module, batch)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))


def test_accuracy_matches_a_hand_count(tiny_model):
    ds = et.generate(et.EntityTrackingConfig(n_contexts=4), seed=0)
    enc = ds.encode(tiny_model.tokenizer)
    logits = tiny_model.logits(enc.tokens)[torch.arange(len(enc)), enc.tokens.last]
    full = (logits.argmax(1) == enc.answer_ids).float().mean().item()
    restricted = sum(
        int(enc.candidate_ids[i][logits[i, enc.candidate_ids[i]].argmax()] == enc.answer_ids[i])
        for i in range(len(enc))
    ) / len(enc)
    assert answer_accuracy(tiny_model.module, enc, batch_size=5) == pytest.approx((restricted, full))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_lowers_the_loss_and_touches_only_what_it_should(tiny_model, method):
    ds = et.generate(et.EntityTrackingConfig(n_contexts=30), seed=0)
    model = copy.deepcopy(tiny_model.module)
    emb_before = model.get_input_embeddings().weight.clone()
    tuned, losses = finetune(
        model, tiny_model.tokenizer, ds, FinetuneConfig(method=method, steps=30, lr=3e-3)
    )
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert torch.equal(tuned.get_input_embeddings().weight, emb_before)  # embeddings stay frozen by default
    if method == "lora":
        assert hasattr(tuned, "peft_config")


def test_bad_finetune_config():
    with pytest.raises(ConfigError, match="method"):
        FinetuneConfig(method="qlora", steps=1, lr=1e-3)
    with pytest.raises(ConfigError, match="lr"):
        FinetuneConfig(method="full", steps=1, lr=0)
