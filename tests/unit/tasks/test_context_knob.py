"""Tests of the context-vs-prior task: items, formats, pairing, the first-token filter and the metrics."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.conftest import bpe_tokenizer
from tunelens.errors import ConfigError, TaskError
from tunelens.tasks.base import Dataset, answer_token_id
from tunelens.tasks.context_knob import (
    DEFAULT_RELATIONS,
    INSTRUCTIONS,
    ContextKnobConfig,
    generate,
    intent_pairs,
    memorisation_ratio,
    pair_accuracy,
    render,
)
from tunelens.tasks.facts import Fact, fact_prompt, fact_question, load_facts


def _facts(rows: list[tuple[str, str, str]]) -> list[Fact]:
    return [Fact(relation=r, subject=s, answer=a) for r, s, a in rows]


SMALL = _facts(
    [
        ("capital", "France", "Paris"),
        ("capital", "Italy", "Rome"),
        ("capital", "Norway", "Oslo"),
        ("capital", "Peru", "Lima"),
        ("capital", "Kenya", "Nairobi"),
        ("landmark_city", "Statue of Liberty", "New York"),
        ("landmark_city", "Red Fort", "New Delhi"),
    ]
)


@pytest.fixture(scope="module")
def shipped() -> Dataset:
    return generate(ContextKnobConfig(include_none=True), seed=0)


@pytest.fixture(scope="module")
def tokenizer(shipped) -> PreTrainedTokenizerFast:
    small = generate(ContextKnobConfig(relations=("capital", "landmark_city")), seed=0, facts=SMALL)
    return bpe_tokenizer(shipped.prompts + small.prompts + [e.answer for e in shipped.examples])


def _answers(relation: str) -> set[str]:
    return {fact.answer for fact in load_facts(relation)}


def test_reproducible_by_seed() -> None:
    cfg = ContextKnobConfig(n_items=50)
    a, b, c = generate(cfg, seed=3), generate(cfg, seed=3), generate(cfg, seed=4)
    assert a.examples == b.examples
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != c.content_hash()
    assert a.task == "context_knob" and a.config["seed"] == 3


def test_all_facts_by_default_and_n_items() -> None:
    facts = load_facts(DEFAULT_RELATIONS)
    ds = generate(ContextKnobConfig(), seed=0)
    assert len(ds) == 2 * len(facts)
    assert {e.item_id for e in ds.examples} == {f.item_id for f in facts}
    small = generate(ContextKnobConfig(n_items=7, include_none=True), seed=0)
    assert len(small) == 21
    assert [e.meta["pair_index"] for e in small.examples] == [i for i in range(7) for _ in range(3)]


def test_counterfactual_differs_and_has_same_relation(shipped) -> None:
    truth = {f.item_id: f.answer for f in load_facts()}
    for e in shipped.examples:
        meta = e.meta
        assert meta["context_answer"] != meta["prior_answer"]
        assert meta["prior_answer"] == truth[e.item_id]
        assert meta["context_answer"] in _answers(meta["relation"])
        assert e.item_id == f"{meta['relation']}:{meta['subject']}"
        assert e.candidates == (" " + meta["prior_answer"], " " + meta["context_answer"])


def test_intents_share_item_and_are_adjacent(shipped) -> None:
    triples = [shipped.examples[i : i + 3] for i in range(0, len(shipped), 3)]
    for ctx, prior, none in triples:
        assert [ctx.meta["intent"], prior.meta["intent"], none.meta["intent"]] == ["context", "prior", None]
        assert [ctx.label, prior.label, none.label] == [1, 0, None]
        assert ctx.item_id == prior.item_id == none.item_id
        assert ctx.meta["pair_index"] == prior.meta["pair_index"] == none.meta["pair_index"]
        assert ctx.answer == " " + ctx.meta["context_answer"]
        assert prior.answer == " " + prior.meta["prior_answer"]
        assert none.answer == " " + none.meta["context_answer"] and none.meta["format"] == "none"
        assert ctx.meta["context_answer"] == prior.meta["context_answer"] == none.meta["context_answer"]
    assert intent_pairs(shipped) == [(i, i + 1) for i in range(0, len(shipped), 3)]


def test_split_never_separates_a_pair(shipped) -> None:
    parts = shipped.split({"train": 0.6, "analysis": 0.2, "test": 0.2}, seed=5)
    assert sum(len(p) for p in parts.values()) == len(shipped)
    seen: dict[str, str] = {}
    for name, part in parts.items():
        assert len(part) % 3 == 0
        assert 3 * len(intent_pairs(part)) == len(part)
        for e in part.examples:
            assert seen.setdefault(e.item_id, name) == name


def test_prompt_formats() -> None:
    fact = Fact(relation="capital", subject="France", answer="Paris")
    head = "Context: The capital of France is Rome.\n"
    tail = "Question: What is the capital of France?\nAnswer:"
    assert render(fact, "Rome", "context", "instruction") == (
        head + "Instruction: Only consider the context in answering the question.\n" + tail
    )
    assert render(fact, "Rome", "prior", "instruction") == (
        head + "Instruction: Ignore the context in answering the question.\n" + tail
    )
    assert render(fact, "Rome", "context", "weight") == head + "Context weight: 1.00\n" + tail
    assert render(fact, "Rome", "prior", "weight") == head + "Context weight: 0.00\n" + tail
    assert render(fact, "Rome", None, "none") == head + tail
    with pytest.raises(ConfigError, match="intent"):
        render(fact, "Rome", None, "instruction")
    with pytest.raises(ConfigError, match="'bogus'"):
        render(fact, "Rome", "context", "bogus")
    # The article rule of the fact table reaches the context sentence too.
    uk = Fact(relation="capital", subject="United Kingdom", answer="London")
    assert render(uk, "Paris", None, "none").startswith(
        "Context: The capital of the United Kingdom is Paris.\n"
    )


def test_generated_prompts_carry_the_right_instruction(shipped) -> None:
    for e in shipped.examples:
        fact = Fact(relation=e.meta["relation"], subject=e.meta["subject"], answer=e.meta["prior_answer"])
        assert e.prompt.startswith("Context: ")
        assert f"Question: {fact_question(fact)}\nAnswer:" in e.prompt
        assert f"{fact_prompt(fact)} {e.meta['context_answer']}." in e.prompt
        intent = e.meta["intent"]
        for name, text in INSTRUCTIONS.items():
            assert (text in e.prompt) == (name == intent)
        assert ("Instruction:" in e.prompt) == (intent is not None)
    weight = generate(ContextKnobConfig(fmt="weight", n_items=5), seed=1)
    for e in weight.examples:
        assert f"Context weight: {'1.00' if e.meta['intent'] == 'context' else '0.00'}\n" in e.prompt
        assert "Instruction" not in e.prompt and e.meta["format"] == "weight"


def _shares_first_token(tok, prior: str, context: str) -> bool:
    return answer_token_id(tok, " " + prior) == answer_token_id(tok, " " + context)


def test_first_token_filter_constructed_case(tokenizer) -> None:
    cfg = ContextKnobConfig(relations=("capital", "landmark_city"))
    unfiltered = generate(cfg, seed=2, facts=SMALL)
    filtered = generate(cfg, seed=2, facts=SMALL, tokenizer=tokenizer)
    pairs = {(e.item_id, e.meta["prior_answer"], e.meta["context_answer"]) for e in unfiltered.examples}
    shared = {p for p in pairs if _shares_first_token(tokenizer, p[1], p[2])}
    # " New York" vs " New Delhi": the only counterfactual of each landmark is the other, sharing " New".
    assert {p[0] for p in shared} == {"landmark_city:Statue of Liberty", "landmark_city:Red Fort"}
    kept = {(e.item_id, e.meta["prior_answer"], e.meta["context_answer"]) for e in filtered.examples}
    assert kept == pairs - shared
    assert [e.meta["pair_index"] for e in filtered.examples] == [
        i for i in range(len(kept)) for _ in range(2)
    ]
    assert filtered.config["tokenizer_filter"] is True


def test_first_token_filter_on_the_shipped_table(tokenizer) -> None:
    cfg = ContextKnobConfig()
    unfiltered = generate(cfg, seed=0)
    filtered = generate(cfg, seed=0, tokenizer=tokenizer)
    pairs = [(e.item_id, e.meta["prior_answer"], e.meta["context_answer"]) for e in unfiltered.examples[::2]]
    expected = [p for p in pairs if not _shares_first_token(tokenizer, p[1], p[2])]
    assert [
        (e.item_id, e.meta["prior_answer"], e.meta["context_answer"]) for e in filtered.examples[::2]
    ] == (expected)
    # n_items counts items after the filter.
    assert len(generate(ContextKnobConfig(n_items=len(expected)), seed=0, tokenizer=tokenizer)) == len(
        filtered
    )
    with pytest.raises(TaskError, match="filter"):
        generate(ContextKnobConfig(n_items=len(expected) + 1), seed=0, tokenizer=tokenizer)


def test_pair_accuracy_against_hand_computation() -> None:
    ds = generate(ContextKnobConfig(relations=("capital",), include_none=True), seed=0, facts=SMALL[:4])
    assert len(ds) == 12  # 4 items x (context, prior, none)
    # per item: (context, prior, none)
    correct = [
        *(True, True, False),  # pair right
        *(True, False, True),  # only context right
        *(False, True, True),  # only prior right
        *(True, True, True),  # pair right
    ]
    predicted_prior = [False, True, True, False, False, True, True, True, False, False, True, False]
    got = pair_accuracy(correct, ds, predicted_prior=predicted_prior)
    assert got == {
        "pair_accuracy": 2 / 4,
        "context_accuracy": 3 / 4,
        "prior_accuracy": 3 / 4,
        "n_pairs": 4,
        "memorisation_ratio": 6 / 12,
    }
    as_tensor = pair_accuracy(torch.tensor(correct), ds)
    assert "memorisation_ratio" not in as_tensor
    assert as_tensor["pair_accuracy"] == 0.5
    assert memorisation_ratio(torch.tensor([True, False, False, False])) == 0.25


def test_pair_accuracy_after_a_split_and_errors() -> None:
    ds = generate(ContextKnobConfig(n_items=20), seed=0)
    part = ds.split({"a": 0.5, "b": 0.5}, seed=1)["a"]
    got = pair_accuracy([e.meta["intent"] == "context" for e in part.examples], part)
    assert got == {"pair_accuracy": 0.0, "context_accuracy": 1.0, "prior_accuracy": 0.0, "n_pairs": 10}
    only_context = ds.subset([i for i, e in enumerate(ds.examples) if e.meta["intent"] == "context"])
    with pytest.raises(TaskError, match="no item with both"):
        pair_accuracy([True] * len(only_context), only_context)
    with pytest.raises(TaskError, match="3 values but the data set has 40"):
        pair_accuracy([True, True, True], ds)
    with pytest.raises(TaskError, match="predicted_prior has 1 values"):
        pair_accuracy([True] * len(ds), ds, predicted_prior=[True])


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="'nope'"):
        ContextKnobConfig(relations=("capital", "nope"))
    with pytest.raises(ConfigError, match="'capital'"):
        ContextKnobConfig(relations="capital")
    with pytest.raises(ConfigError, match="0"):
        ContextKnobConfig(n_items=0)
    with pytest.raises(ConfigError, match="'none'"):
        ContextKnobConfig(fmt="none")
    with pytest.raises(ConfigError, match="repeat"):
        ContextKnobConfig(relations=("capital", "capital"))
    assert ContextKnobConfig(relations=["capital"]).relations == ("capital",)


def test_generate_errors() -> None:
    with pytest.raises(TaskError, match="only 5 items"):
        generate(ContextKnobConfig(relations=("capital",), n_items=6), seed=0, facts=SMALL)
    lonely = _facts([("continent", "France", "Europe"), ("continent", "Spain", "Europe")])
    with pytest.raises(TaskError, match="'continent' has 1 distinct"):
        generate(ContextKnobConfig(relations=("continent",)), seed=0, facts=lonely)
    with pytest.raises(TaskError, match="no facts"):
        generate(ContextKnobConfig(relations=("currency",)), seed=0, facts=SMALL)


def test_counterfactual_draws_cover_other_answers() -> None:
    draws = defaultdict(set)
    for seed in range(30):
        for e in generate(ContextKnobConfig(relations=("capital",)), seed=seed, facts=SMALL).examples[::2]:
            draws[e.meta["subject"]].add(e.meta["context_answer"])
    for subject, answers in draws.items():
        truth = next(f.answer for f in SMALL if f.subject == subject)
        assert answers == {f.answer for f in SMALL if f.relation == "capital"} - {truth}
