"""Tests of the shipped fact table, its prompts and the leak-free splitter."""

from __future__ import annotations

from collections import Counter

import pytest

from tunelens.errors import ConfigError, TaskError
from tunelens.tasks.facts import (
    RELATION_QUESTIONS,
    RELATION_TEMPLATES,
    Fact,
    fact_prompt,
    fact_question,
    load_facts,
    relations,
    split_by_item,
)

FRACTIONS = {"train": 0.6, "analysis": 0.2, "test": 0.2}


def _answers() -> dict[tuple[str, str], str]:
    return {(fact.relation, fact.subject): fact.answer for fact in load_facts()}


def test_table_size_and_relations() -> None:
    facts = load_facts()
    counts = Counter(fact.relation for fact in facts)
    assert len(facts) >= 560
    assert len(counts) >= 6
    assert all(count >= 50 for count in counts.values()), counts
    assert set(relations()) == set(counts)
    assert set(relations()) == set(RELATION_TEMPLATES) == set(RELATION_QUESTIONS)


def test_subjects_unique_per_relation_and_fields_clean() -> None:
    facts = load_facts()
    ids = [fact.item_id for fact in facts]
    assert len(ids) == len(set(ids))
    for fact in facts:
        for value in (fact.relation, fact.subject, fact.answer):
            assert value, fact
            assert value == value.strip(), fact


@pytest.mark.parametrize(
    ("relation", "subject", "answer"),
    [
        ("capital", "France", "Paris"),
        ("capital", "Japan", "Tokyo"),
        ("continent", "Brazil", "South America"),
        ("language", "Brazil", "Portuguese"),
        ("currency", "Japan", "yen"),
        ("currency", "Germany", "euro"),
        ("landmark_city", "Eiffel Tower", "Paris"),
        ("element_symbol", "gold", "Au"),
        ("element_symbol", "oxygen", "O"),
        ("opposite", "hot", "cold"),
    ],
)
def test_spot_checks(relation: str, subject: str, answer: str) -> None:
    assert _answers()[(relation, subject)] == answer


def test_continents_are_the_six_allowed() -> None:
    allowed = {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
    assert {fact.answer for fact in load_facts(["continent"])} <= allowed


def test_load_facts_filters_in_file_order() -> None:
    everything = load_facts()
    picked = load_facts(["opposite", "capital"])
    assert {fact.relation for fact in picked} == {"capital", "opposite"}
    assert list(picked) == [fact for fact in everything if fact.relation in {"capital", "opposite"}]
    assert load_facts("capital") == load_facts(["capital"])


def test_unknown_relation_raises_task_error_naming_valid_ones() -> None:
    with pytest.raises(TaskError, match="capital"):
        load_facts(["capital", "planet_moon"])


def test_prompts_and_questions() -> None:
    france = Fact(relation="capital", subject="France", answer="Paris")
    assert fact_prompt(france) == "The capital of France is"
    assert fact_question(france) == "What is the capital of France?"
    assert france.item_id == "capital:France"
    gold = Fact(relation="element_symbol", subject="gold", answer="Au")
    assert fact_prompt(gold) == "The chemical symbol of gold is"
    usa = Fact(relation="continent", subject="United States", answer="North America")
    assert fact_prompt(usa) == "The United States is a country in the continent of"
    for fact in load_facts():
        assert fact.subject in fact_prompt(fact)
        assert fact_question(fact).endswith("?")


def test_prompt_for_unknown_relation_raises() -> None:
    with pytest.raises(TaskError):
        fact_prompt(Fact(relation="nope", subject="x", answer="y"))


def test_split_is_reproducible_and_seed_dependent() -> None:
    facts = load_facts()
    first = split_by_item(facts, FRACTIONS, seed=0, key=lambda fact: fact.item_id)
    again = split_by_item(facts, FRACTIONS, seed=0, key=lambda fact: fact.item_id)
    other = split_by_item(facts, FRACTIONS, seed=1, key=lambda fact: fact.item_id)
    assert first == again
    assert first != other
    assert list(first) == list(FRACTIONS)


def test_split_is_disjoint_covering_and_keeps_order() -> None:
    facts = load_facts()
    parts = split_by_item(facts, FRACTIONS, seed=3, key=lambda fact: fact.item_id)
    ids = [{fact.item_id for fact in part} for part in parts.values()]
    assert sum(len(part) for part in parts.values()) == len(facts)
    assert set().union(*ids) == {fact.item_id for fact in facts}
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert not ids[i] & ids[j]
    position = {fact.item_id: index for index, fact in enumerate(facts)}
    for part in parts.values():
        assert [position[fact.item_id] for fact in part] == sorted(position[fact.item_id] for fact in part)
    assert abs(len(parts["train"]) - 0.6 * len(facts)) <= 1


def test_split_keeps_same_key_items_together() -> None:
    items = [(f"k{i % 13}", i) for i in range(100)]
    parts = split_by_item(items, {"a": 0.5, "b": 0.5}, seed=7, key=lambda item: item[0])
    keys_a = {k for k, _ in parts["a"]}
    keys_b = {k for k, _ in parts["b"]}
    assert keys_a.isdisjoint(keys_b)
    assert keys_a | keys_b == {f"k{i}" for i in range(13)}
    assert sorted(parts["a"] + parts["b"]) == sorted(items)


def test_split_of_nothing_gives_empty_parts() -> None:
    assert split_by_item([], FRACTIONS, seed=0, key=str) == {"train": [], "analysis": [], "test": []}


@pytest.mark.parametrize(
    "fractions",
    [{"train": 0.5, "test": 0.4}, {"train": 1.2, "test": -0.2}, {"train": 1.0, "test": 0.0}, {}],
)
def test_bad_fractions_raise_config_error(fractions: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="fractions"):
        split_by_item([1, 2, 3], fractions, seed=0, key=str)
