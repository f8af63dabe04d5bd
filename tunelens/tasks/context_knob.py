"""Context vs prior (Minder et al. 2024, "CCS"): answer from the context or from memory, as instructed.

A *knowledge-conflict item* pairs a fact with a counterfactual answer of the same relation. Its context
asserts the counterfactual; the question asks for the fact; the *intent* says which source to follow::

    Context: The capital of France is Rome.
    Instruction: Ignore the context in answering the question.
    Question: What is the capital of France?
    Answer:                                                          ->  " Paris"   (intent "prior")

With the instruction ``Only consider the context in answering the question.`` the answer is ``" Rome"``
(intent "context"). Three prompt formats (:func:`render`):

- ``instruction``: ``Context: …\\nInstruction: …\\nQuestion: …\\nAnswer:`` as above;
- ``weight``: ``Context: …\\nContext weight: 1.00|0.00\\nQuestion: …\\nAnswer:`` (1.00 = follow the
  context);
- ``none``: ``Context: …\\nQuestion: …\\nAnswer:`` — no intent at all, for steering with the knob.

Every item yields its context-intent example, then its prior-intent example, then (with
``include_none``) its instruction-free example, adjacent and in that order. All of them share the fact's
``item_id``, so :meth:`Dataset.split` never separates them. ``candidates`` is always
``(" " + prior_answer, " " + context_answer)`` (index 0 = prior), ``label`` is 1 for intent context,
0 for intent prior and ``None`` for the instruction-free example, whose ``answer`` is the context answer
(what a plain reading asks for; analyses of it should use ``meta`` and the candidates instead).

The headline metric is **pair accuracy** (:func:`pair_accuracy`): the fraction of items whose two
intents are both answered correctly.

Example:
    >>> facts = [Fact(relation="capital", subject=s, answer=a)
    ...          for s, a in [("France", "Paris"), ("Italy", "Rome"), ("Norway", "Oslo")]]
    >>> ds = generate(ContextKnobConfig(relations=("capital",)), seed=0, facts=facts)
    >>> len(ds), [e.meta["intent"] for e in ds.examples[:2]], [e.label for e in ds.examples[:2]]
    (6, ['context', 'prior'], [1, 0])
    >>> first = ds.examples[0]
    >>> first.meta["context_answer"] != first.meta["prior_answer"]
    True
    >>> pair_accuracy([True, True, True, False, False, False], ds)["pair_accuracy"]
    0.3333333333333333
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from torch import Tensor

from tunelens.errors import ConfigError, TaskError
from tunelens.tasks.base import Dataset, Example, answer_token_id
from tunelens.tasks.facts import RELATION_TEMPLATES, Fact, fact_prompt, fact_question, load_facts

Intent = Literal["context", "prior"]
Format = Literal["instruction", "weight", "none"]

DEFAULT_RELATIONS: tuple[str, ...] = (
    "capital",
    "language",
    "currency",
    "landmark_city",
    "continent",
    "element_symbol",
)

INSTRUCTIONS: dict[str, str] = {
    "context": "Only consider the context in answering the question.",
    "prior": "Ignore the context in answering the question.",
}
"""The instruction line of the ``instruction`` format, per intent."""

WEIGHTS: dict[str, str] = {"context": "1.00", "prior": "0.00"}
"""The ``Context weight`` value of the ``weight`` format, per intent."""


@dataclass(frozen=True, kw_only=True)
class ContextKnobConfig:
    """Which facts become knowledge-conflict items, how many, and in which prompt format."""

    relations: tuple[str, ...] = DEFAULT_RELATIONS
    n_items: int | None = None
    fmt: Literal["instruction", "weight"] = "instruction"
    include_none: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.relations, str) or not isinstance(self.relations, Sequence):
            raise ConfigError(f"relations must be a tuple of relation names, got {self.relations!r}")
        object.__setattr__(self, "relations", tuple(self.relations))
        if not self.relations:
            raise ConfigError("relations must name at least one relation, got ()")
        unknown = [r for r in self.relations if r not in RELATION_TEMPLATES]
        if unknown:
            raise ConfigError(
                f"unknown relation(s) {unknown}; valid relations are {list(RELATION_TEMPLATES)}"
            )
        if len(set(self.relations)) != len(self.relations):
            raise ConfigError(f"relations must not repeat, got {self.relations}")
        if self.n_items is not None and (
            isinstance(self.n_items, bool) or not isinstance(self.n_items, int) or self.n_items < 1
        ):
            raise ConfigError(f"n_items must be None (all) or an integer >= 1, got {self.n_items!r}")
        if self.fmt not in ("instruction", "weight"):
            raise ConfigError(f"fmt must be 'instruction' or 'weight', got {self.fmt!r}")
        if not isinstance(self.include_none, bool):
            raise ConfigError(f"include_none must be True or False, got {self.include_none!r}")


def context_sentence(fact: Fact, context_answer: str) -> str:
    """The counterfactual assertion, e.g. ``"The capital of France is Rome."``."""
    counterfactual = Fact(relation=fact.relation, subject=fact.subject, answer=context_answer)
    return f"{fact_prompt(counterfactual)} {context_answer}."


def render(fact: Fact, context_answer: str, intent: Intent | None, fmt: Format) -> str:
    """The prompt of one item in one format; ``intent`` must be ``None`` exactly for ``fmt="none"``."""
    if fmt not in get_args(Format):
        raise ConfigError(f"fmt must be one of {list(get_args(Format))}, got {fmt!r}")
    if (fmt == "none") != (intent is None):
        raise ConfigError(
            f"format {fmt!r} needs intent {'None' if fmt == 'none' else 'context|prior'}, got {intent!r}"
        )
    if intent is not None and intent not in INSTRUCTIONS:
        raise ConfigError(f"intent must be 'context' or 'prior', got {intent!r}")
    lines = [f"Context: {context_sentence(fact, context_answer)}"]
    if fmt == "instruction":
        lines.append(f"Instruction: {INSTRUCTIONS[intent]}")
    elif fmt == "weight":
        lines.append(f"Context weight: {WEIGHTS[intent]}")
    lines += [f"Question: {fact_question(fact)}", "Answer:"]
    return "\n".join(lines)


def _counterfactuals(facts: Sequence[Fact], rng: random.Random) -> list[tuple[Fact, str]]:
    """One counterfactual answer per fact: another answer of its relation, uniform over distinct answers."""
    answers: dict[str, list[str]] = {}
    for fact in facts:
        answers.setdefault(fact.relation, [])
        if fact.answer not in answers[fact.relation]:
            answers[fact.relation].append(fact.answer)
    for relation, values in answers.items():
        if len(values) < 2:
            raise TaskError(
                f"relation {relation!r} has {len(values)} distinct answer(s) among the facts; "
                "a counterfactual needs at least 2. Add facts of that relation or drop it from relations."
            )
    out = []
    for fact in facts:
        others = sorted(a for a in answers[fact.relation] if a != fact.answer)
        out.append((fact, rng.choice(others)))
    return out


def _example(fact: Fact, context_answer: str, intent: Intent | None, fmt: Format, pair_index: int) -> Example:
    answer = {"context": context_answer, "prior": fact.answer, None: context_answer}[intent]
    return Example(
        prompt=render(fact, context_answer, intent, fmt),
        answer=" " + answer,
        candidates=(" " + fact.answer, " " + context_answer),
        item_id=fact.item_id,
        label={"context": 1, "prior": 0, None: None}[intent],
        meta={
            "intent": intent,
            "prior_answer": fact.answer,
            "context_answer": context_answer,
            "relation": fact.relation,
            "subject": fact.subject,
            "format": fmt,
            "pair_index": pair_index,
        },
    )


def generate(
    cfg: ContextKnobConfig,
    seed: int,
    facts: Sequence[Fact] | None = None,
    tokenizer=None,
) -> Dataset:
    """Knowledge-conflict examples, reproducibly from ``seed``.

    Method: the facts of ``cfg.relations`` (the shipped table, or ``facts`` filtered to those relations)
    are shuffled with ``random.Random(seed)``; each draws a counterfactual answer, uniformly among the
    *other distinct* answers of its relation in those facts. With a ``tokenizer``, items whose two answers
    share a first token (:func:`~tunelens.tasks.base.answer_token_id`) are dropped, since first-token
    scoring cannot tell them apart; dropping never changes the counterfactuals of the other items. The
    first ``cfg.n_items`` remaining items are kept, in shuffled order.

    Args:
        cfg: relations, number of items, intent format, whether to add the instruction-free example.
        seed: the seed of the shuffle and of the counterfactual draws.
        facts: the facts to build items from; ``None`` loads the shipped table.
        tokenizer: an HF tokenizer; if given, items it cannot score by first token are dropped.

    Returns:
        A :class:`Dataset` of task ``"context_knob"`` with 2 (or 3) adjacent examples per item.

    Raises:
        TaskError: a relation has fewer than two distinct answers, no fact is left, or fewer than
            ``cfg.n_items`` items remain after filtering.
    """
    if facts is None:
        facts = load_facts(cfg.relations)
    else:
        facts = [fact for fact in facts if fact.relation in cfg.relations]
    if not facts:
        raise TaskError(f"no facts of relations {list(cfg.relations)}; expected at least one")
    rng = random.Random(seed)
    order = list(facts)
    rng.shuffle(order)
    items = _counterfactuals(order, rng)
    if tokenizer is not None:
        items = [
            (fact, cf)
            for fact, cf in items
            if answer_token_id(tokenizer, " " + fact.answer) != answer_token_id(tokenizer, " " + cf)
        ]
    if cfg.n_items is not None:
        if len(items) < cfg.n_items:
            raise TaskError(
                f"n_items={cfg.n_items} asked, but only {len(items)} items are available for relations "
                f"{list(cfg.relations)}"
                + (" after the shared-first-token filter" if tokenizer is not None else "")
            )
        items = items[: cfg.n_items]
    intents: list[Intent | None] = ["context", "prior", *([None] if cfg.include_none else [])]
    examples = [
        _example(fact, cf, intent, cfg.fmt if intent is not None else "none", i)
        for i, (fact, cf) in enumerate(items)
        for intent in intents
    ]
    config: dict[str, Any] = {**asdict(cfg), "seed": seed, "tokenizer_filter": tokenizer is not None}
    return Dataset(task="context_knob", config=config, examples=tuple(examples))


def intent_pairs(dataset: Dataset) -> list[tuple[int, int]]:
    """``(context_index, prior_index)`` per item that has both intents, in order of first appearance.

    Examples are grouped by ``(item_id, meta["pair_index"])``; instruction-free examples are skipped, and an
    item missing one intent (e.g. after :meth:`Dataset.subset`) contributes no pair.

    Raises:
        TaskError: an example lacks the task's meta, or an item has two examples of one intent.
    """
    groups: dict[tuple[str, Any], dict[str, int]] = {}
    for i, example in enumerate(dataset.examples):
        if "intent" not in example.meta or "pair_index" not in example.meta:
            raise TaskError(
                f"example {i} has no 'intent' / 'pair_index' meta; expected a context_knob data set"
            )
        intent = example.meta["intent"]
        if intent is None:
            continue
        group = groups.setdefault((example.item_id, example.meta["pair_index"]), {})
        if intent in group:
            raise TaskError(
                f"item {example.item_id!r} (pair {example.meta['pair_index']}) has two {intent!r} examples "
                f"({group[intent]} and {i}); expected one per intent"
            )
        group[intent] = i
    return [(g["context"], g["prior"]) for g in groups.values() if "context" in g and "prior" in g]


def _as_bools(values: Sequence[bool] | Tensor, name: str, n: int | None = None) -> list[bool]:
    """Flags as a list of bools; ``n`` (if given) is the required length."""
    if isinstance(values, Tensor):
        if values.ndim != 1:
            raise TaskError(f"{name} must be one value per example (1-D), got shape {tuple(values.shape)}")
        values = values.detach().cpu().tolist()
    out = [bool(v) for v in values]
    if n is not None and len(out) != n:
        raise TaskError(f"{name} has {len(out)} values but the data set has {n} examples; expected one each")
    return out


def memorisation_ratio(predicted_prior: Sequence[bool] | Tensor) -> float:
    """MR = #prior / (#prior + #context), where each prediction is one of the two candidates.

    ``predicted_prior[i]`` is True when example ``i``'s prediction is the prior answer (candidate 0) and
    False when it is the context answer (candidate 1).
    """
    flags = _as_bools(predicted_prior, "predicted_prior")
    if not flags:
        raise TaskError("memorisation ratio of no predictions; expected at least one")
    return sum(flags) / len(flags)


def pair_accuracy(
    correct: Sequence[bool] | Tensor,
    dataset: Dataset,
    predicted_prior: Sequence[bool] | Tensor | None = None,
) -> dict[str, float | int]:
    """Pair, context and prior accuracy (and optionally the memorisation ratio) of per-example results.

    Args:
        correct: one flag per example of ``dataset``: was its answer right? Entries of instruction-free
            examples are ignored.
        dataset: a ``context_knob`` data set (or a split / subset of one).
        predicted_prior: one flag per example: did the model pick the prior answer (candidate 0) rather
            than the context answer? If given, ``memorisation_ratio`` is computed over *all* examples.

    Returns:
        ``pair_accuracy`` (both intents of an item right), ``context_accuracy``, ``prior_accuracy`` (over
        the examples of complete pairs), ``n_pairs`` and, with ``predicted_prior``, ``memorisation_ratio``.

    Raises:
        TaskError: lengths differ from the data set, or it holds no item with both intents.
    """
    flags = _as_bools(correct, "correct", len(dataset))
    pairs = intent_pairs(dataset)
    if not pairs:
        raise TaskError(
            f"the data set ({len(dataset)} examples) has no item with both a context and a prior example; "
            "pair accuracy needs complete pairs"
        )
    n = len(pairs)
    out: dict[str, float | int] = {
        "pair_accuracy": sum(flags[c] and flags[p] for c, p in pairs) / n,
        "context_accuracy": sum(flags[c] for c, _ in pairs) / n,
        "prior_accuracy": sum(flags[p] for _, p in pairs) / n,
        "n_pairs": n,
    }
    if predicted_prior is not None:
        out["memorisation_ratio"] = memorisation_ratio(
            _as_bools(predicted_prior, "predicted_prior", len(dataset))
        )
    return out
