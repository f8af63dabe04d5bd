"""A shipped table of well-known facts, the prompts that ask for them, and a leak-free splitter.

The table lives in ``tunelens/tasks/data/facts.csv`` (columns ``relation,subject,answer``). Each relation
has a completion template whose natural next word is the answer (``"The capital of France is"`` ->
``" Paris"``) and a question form for chat / QA prompts.

Country names that take a definite article in English (``the United States``, ``the Netherlands``) are
stored without it and get it back when a prompt is built, so prompts stay grammatical.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

from tunelens.errors import ConfigError, TaskError

T = TypeVar("T")

_FRACTION_TOLERANCE = 1e-9

RELATION_TEMPLATES: dict[str, str] = {
    "capital": "The capital of {subject} is",
    "continent": "{subject} is a country in the continent of",
    "language": "The official language of {subject} is",
    "currency": "The currency of {subject} is the",
    "landmark_city": "The {subject} is located in the city of",
    "element_symbol": "The chemical symbol of {subject} is",
    "opposite": "The opposite of {subject} is",
}
"""Completion prompt per relation; the answer is the natural next word."""

RELATION_QUESTIONS: dict[str, str] = {
    "capital": "What is the capital of {subject}?",
    "continent": "Which continent is {subject} in?",
    "language": "What is the official language of {subject}?",
    "currency": "What is the currency of {subject}?",
    "landmark_city": "In which city is the {subject} located?",
    "element_symbol": "What is the chemical symbol of {subject}?",
    "opposite": "What is the opposite of {subject}?",
}
"""Question form per relation, for chat / QA prompts."""

_COUNTRY_RELATIONS = frozenset({"capital", "continent", "language", "currency"})

_TAKES_THE = frozenset(
    {
        "Bahamas",
        "Czech Republic",
        "Democratic Republic of the Congo",
        "Dominican Republic",
        "Netherlands",
        "Philippines",
        "Solomon Islands",
        "United Arab Emirates",
        "United Kingdom",
        "United States",
    }
)
"""Country subjects that read as "the X" in running English text."""


@dataclass(frozen=True, kw_only=True)
class Fact:
    """One row of the fact table: ``relation(subject) = answer``."""

    relation: str
    subject: str
    answer: str

    @property
    def item_id(self) -> str:
        """A stable identifier, ``"relation:subject"``, unique within the table."""
        return f"{self.relation}:{self.subject}"


@functools.cache
def _all_facts() -> tuple[Fact, ...]:
    """Parse the shipped CSV once, in file order."""
    text = (resources.files("tunelens.tasks") / "data" / "facts.csv").read_text(encoding="utf-8")
    return tuple(
        Fact(relation=row["relation"], subject=row["subject"], answer=row["answer"])
        for row in csv.DictReader(io.StringIO(text))
    )


def relations() -> tuple[str, ...]:
    """The relation names in the table, in order of first appearance."""
    return tuple(dict.fromkeys(fact.relation for fact in _all_facts()))


def load_facts(relations: Sequence[str] | None = None) -> tuple[Fact, ...]:
    """Load the fact table, optionally keeping only some relations.

    Args:
        relations: relation names to keep (a single name is accepted too); ``None`` keeps all.

    Returns:
        The facts in the order of the CSV file, whatever order ``relations`` is given in.

    Raises:
        TaskError: a requested relation is not in the table.
    """
    facts = _all_facts()
    if relations is None:
        return facts
    wanted = {relations} if isinstance(relations, str) else set(relations)
    valid = tuple(dict.fromkeys(fact.relation for fact in facts))
    unknown = sorted(wanted.difference(valid))
    if unknown:
        raise TaskError(f"unknown relation(s) {unknown}; valid relations are {list(valid)}")
    return tuple(fact for fact in facts if fact.relation in wanted)


def _fill(templates: Mapping[str, str], fact: Fact) -> str:
    """Fill the template of ``fact.relation``, adding "the" to countries that take it."""
    try:
        template = templates[fact.relation]
    except KeyError:
        raise TaskError(
            f"no prompt template for relation {fact.relation!r}; valid relations are {list(templates)}"
        ) from None
    subject = fact.subject
    if fact.relation in _COUNTRY_RELATIONS and subject in _TAKES_THE:
        subject = f"the {subject}"
    text = template.format(subject=subject)
    return text[0].upper() + text[1:]


def fact_prompt(fact: Fact) -> str:
    """The completion prompt for ``fact``, e.g. ``"The capital of France is"`` (no trailing space)."""
    return _fill(RELATION_TEMPLATES, fact)


def fact_question(fact: Fact) -> str:
    """The question form for ``fact``, e.g. ``"What is the capital of France?"``."""
    return _fill(RELATION_QUESTIONS, fact)


def _check_fractions(fractions: Mapping[str, float]) -> None:
    """Raise ConfigError unless the fractions are positive, finite and sum to 1."""
    values = list(fractions.values())
    if (
        not values
        or not all(math.isfinite(value) and value > 0 for value in values)
        or abs(math.fsum(values) - 1.0) > _FRACTION_TOLERANCE
    ):
        raise ConfigError(
            f"split fractions must be positive and sum to 1, got {dict(fractions)} "
            f"(sum {math.fsum(values) if values else 0.0})"
        )


def _part_sizes(n_keys: int, fractions: Mapping[str, float]) -> list[int]:
    """Split ``n_keys`` into integer sizes proportional to ``fractions`` (largest remainder method)."""
    exact = [fraction * n_keys for fraction in fractions.values()]
    sizes = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: n_keys - sum(sizes)]:
        sizes[i] += 1
    return sizes


def split_by_item(
    items: Sequence[T],
    fractions: Mapping[str, float],
    seed: int,
    key: Callable[[T], str],
) -> dict[str, list[T]]:
    """Split ``items`` into named parts so that items sharing a key never land in different parts.

    Method: the unique keys are sorted, shuffled with ``random.Random(seed)``, and cut into consecutive
    runs whose sizes follow ``fractions`` (largest-remainder rounding, so part sizes are exact to within
    one key). The result depends only on the set of keys and the seed, not on input order; adding new
    keys can move existing ones. Parts are counted in keys, not items.

    Args:
        items: what to split (facts, prompts, pairs, ...).
        fractions: part name -> share of keys, e.g. ``{"train": 0.6, "analysis": 0.2, "test": 0.2}``.
        seed: the seed of the shuffle; the same seed gives the same split.
        key: the grouping key of an item, e.g. ``lambda fact: fact.item_id``.

    Returns:
        A dict with one list per part, in the order of ``fractions``; each list keeps input order.

    Raises:
        ConfigError: a fraction is not positive or the fractions do not sum to 1.
    """
    _check_fractions(fractions)
    unique_keys = sorted({key(item) for item in items})
    random.Random(seed).shuffle(unique_keys)
    part_of: dict[str, str] = {}
    start = 0
    for name, size in zip(fractions, _part_sizes(len(unique_keys), fractions), strict=True):
        for item_key in unique_keys[start : start + size]:
            part_of[item_key] = name
        start += size
    parts: dict[str, list[T]] = {name: [] for name in fractions}
    for item in items:
        parts[part_of[key(item)]].append(item)
    return parts
