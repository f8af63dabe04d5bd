"""Tests of the knowledge-probe data: known_by, true/false statements, known/unknown, bad-shot prompts."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.conftest import bpe_tokenizer
from tunelens.backends.base import TokenBatch
from tunelens.errors import ConfigError, ShapeError, TaskError
from tunelens.tasks.base import answer_token_id
from tunelens.tasks.facts import RELATION_TEMPLATES, Fact, fact_prompt, load_facts
from tunelens.tasks.knowledge import known_by, known_unknown, misleading_context, true_false


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    facts = load_facts()
    return bpe_tokenizer([f"{fact_prompt(f)} {f.answer}." for f in facts])


def _answers(relation: str) -> set[str]:
    return {fact.answer for fact in load_facts(relation)}


def _fake_logits_fn(tokenizer, facts: list[Fact], chosen: set[int]):
    """Logits whose argmax at each prompt's last real token is the answer for ``chosen`` facts only.

    Every *other* position (padding included) puts a larger maximum on the true answer, so reading the
    wrong position would call every fact known.
    """
    vocab = len(tokenizer)
    target: dict[tuple[int, ...], tuple[int, int]] = {}
    for i, fact in enumerate(facts):
        ids = tuple(tokenizer(fact_prompt(fact))["input_ids"])
        answer = answer_token_id(tokenizer, " " + fact.answer)
        target[ids] = (answer, answer if i in chosen else (answer + 1) % vocab)
    calls: list[int] = []

    def fn(batch: TokenBatch) -> torch.Tensor:
        calls.append(len(batch))
        n, pos = batch.input_ids.shape
        logits = torch.zeros(n, pos, vocab)
        for row in range(n):
            length = int(batch.attention_mask[row].sum())
            answer, at_last = target[tuple(batch.input_ids[row, :length].tolist())]
            logits[row, :, answer] = 10.0
            logits[row, length - 1] = 0.0
            logits[row, length - 1, at_last] = 5.0
        return logits

    fn.calls = calls
    return fn


def test_known_by_reads_the_last_real_token(tokenizer) -> None:
    facts = list(load_facts("capital")[:11])
    longest = max(load_facts("capital")[11:], key=lambda f: len(fact_prompt(f)))
    facts.append(longest)  # the longest prompt: the others of its batch are padded
    chosen = {0, 3, 4, 9}
    fn = _fake_logits_fn(tokenizer, facts, chosen)
    known = known_by(fn, tokenizer, facts, batch_size=5)
    assert known == [i in chosen for i in range(len(facts))]
    assert fn.calls == [5, 5, 2]
    assert known_by(fn, tokenizer, [], batch_size=5) == []


def test_known_by_errors(tokenizer) -> None:
    facts = list(load_facts("capital")[:3])
    with pytest.raises(ConfigError, match="batch_size"):
        known_by(lambda batch: None, tokenizer, facts, batch_size=0)
    with pytest.raises(ShapeError, match=r"\(3, 7\)"):
        known_by(lambda batch: torch.zeros(3, 7), tokenizer, facts)


def test_true_false_statements() -> None:
    facts = load_facts(("capital", "currency"))
    ds = true_false(facts, seed=0)
    assert ds.task == "true_false" and len(ds) == 2 * len(facts)
    assert ds.examples == true_false(facts, seed=0).examples
    assert ds.content_hash() != true_false(facts, seed=1).content_hash()
    for fact, (true, false) in zip(facts, zip(ds.examples[::2], ds.examples[1::2], strict=True), strict=True):
        assert true.item_id == false.item_id == fact.item_id
        assert (true.label, false.label) == (1, 0)
        assert true.prompt == f"{fact_prompt(fact)} {fact.answer}." and true.answer == " " + fact.answer
        wrong = false.meta["stated_answer"]
        assert wrong != fact.answer and wrong in _answers(fact.relation)
        assert false.prompt == f"{fact_prompt(fact)} {wrong}." and false.answer == " " + wrong
        assert true.candidates == false.candidates == ()


def test_true_false_sampling() -> None:
    facts = load_facts("capital")
    full = true_false(facts, seed=4)
    some = true_false(facts, seed=4, n_items=10)
    assert len(some) == 20 and some.examples == true_false(facts, seed=4, n_items=10).examples
    # Sampling keeps each chosen fact's statements exactly as in the full data set.
    assert all(e in full.examples for e in some.examples)
    with pytest.raises(TaskError, match=f"only {len(facts)} facts"):
        true_false(facts, seed=0, n_items=len(facts) + 1)
    with pytest.raises(ConfigError, match="n_items"):
        true_false(facts, seed=0, n_items=0)
    with pytest.raises(TaskError, match="one distinct answer"):
        true_false([Fact(relation="capital", subject="France", answer="Paris")], seed=0)


def test_known_unknown() -> None:
    facts = list(load_facts("capital")[:4])
    ds = known_unknown(facts, [True, False, False, True])
    assert ds.task == "known_unknown"
    assert ds.labels == [1, 0, 0, 1]
    assert ds.prompts == [fact_prompt(f) for f in facts]
    assert [e.answer for e in ds.examples] == [" " + f.answer for f in facts]
    assert [e.item_id for e in ds.examples] == [f.item_id for f in facts]


def test_known_unknown_errors() -> None:
    facts = list(load_facts("capital")[:4])
    with pytest.raises(TaskError, match="4 facts but 3 known flags"):
        known_unknown(facts, [True, False, True])
    with pytest.raises(TaskError, match="4 known and 0 unknown"):
        known_unknown(facts, [True] * 4)
    with pytest.raises(TaskError, match="0 known and 4 unknown"):
        known_unknown(facts, [False] * 4)


def test_misleading_context_shots_are_wrong_and_same_relation() -> None:
    facts = load_facts(("capital", "continent", "element_symbol"))
    ds = misleading_context(facts, seed=0)
    assert ds.task == "misleading" and len(ds) == len(facts)
    assert ds.examples == misleading_context(facts, seed=0).examples
    truth = {(f.relation, f.subject): f.answer for f in facts}
    for fact, e in zip(facts, ds.examples, strict=True):
        lines = e.prompt.split("\n")
        assert len(lines) == 4 and lines[-1] == fact_prompt(fact)
        assert e.answer == " " + fact.answer and e.item_id == fact.item_id
        assert lines[:3] == list(e.meta["shots"])
        assert len(set(e.meta["shot_subjects"])) == 3 and fact.subject not in e.meta["shot_subjects"]
        for line, subject, shown, real in zip(
            lines[:3],
            e.meta["shot_subjects"],
            e.meta["shot_answers"],
            e.meta["shot_true_answers"],
            strict=True,
        ):
            shot = Fact(relation=fact.relation, subject=subject, answer=real)
            assert truth[(fact.relation, subject)] == real
            assert line == f"{fact_prompt(shot)} {shown}."
            assert shown != real and shown != fact.answer and shown in _answers(fact.relation)


def test_misleading_context_format_and_errors() -> None:
    facts = [
        Fact(relation="capital", subject=s, answer=a)
        for s, a in [("France", "Paris"), ("Spain", "Madrid"), ("Peru", "Lima"), ("Kenya", "Nairobi")]
    ]
    prompt = misleading_context(facts, seed=0).examples[0].prompt
    template = RELATION_TEMPLATES["capital"].split("{")[0]
    assert all(line.startswith(template) for line in prompt.split("\n"))
    assert prompt.endswith("\nThe capital of France is")
    with pytest.raises(TaskError, match="at least 4 facts"):
        misleading_context(facts[:3], seed=0)
    with pytest.raises(ConfigError, match="n_shots"):
        misleading_context(facts, seed=0, n_shots=0)
    assert len(misleading_context(facts, seed=0, n_shots=2).examples[0].meta["shots"]) == 2
