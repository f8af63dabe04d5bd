"""Facts for the knowledge probes: which facts a model knows, true/false statements, error-inducing prompts.

Four builders over the shipped fact table (:mod:`tunelens.tasks.facts`):

- :func:`known_by` — a fact is *known* when the model's greedy next token after its completion prompt
  (``"The capital of France is"``) is the answer's first token (``" Paris"``).
- :func:`true_false` (task ``"true_false"``) — per fact one true and one false statement, e.g.
  ``"The capital of France is Paris."`` (label 1) and ``"The capital of France is Oslo."`` (label 0);
  the false answer is another answer of the same relation. For truth probes on the final token.
- :func:`known_unknown` (task ``"known_unknown"``) — the completion prompts labelled 1 if known, 0 if not:
  the P(IK) probe target (Kadavath et al. 2022), read at the last prompt token.
- :func:`misleading_context` (task ``"misleading"``) — the WACK "bad shots" prompt (Simhi et al.):
  three demonstrations of the same relation with *wrong* answers, one per line, then the fact's prompt::

      The capital of Spain is Rome.
      The capital of Peru is Oslo.
      The capital of Kenya is Lima.
      The capital of France is            ->  " Paris" (a known fact answered wrongly here is HK+)

Every example carries the fact's ``item_id``, so a fact's statements never straddle a split.

Example:
    >>> facts = [Fact(relation="capital", subject=s, answer=a) for s, a in
    ...          [("France", "Paris"), ("Italy", "Rome"), ("Norway", "Oslo"), ("Peru", "Lima")]]
    >>> [e.prompt for e in true_false(facts, seed=0).examples[:1]]
    ['The capital of France is Paris.']
    >>> ds = known_unknown(facts, [True, False, True, False])
    >>> ds.labels, ds.examples[0].answer
    ([1, 0, 1, 0], ' Paris')
    >>> print(misleading_context(facts, seed=0).examples[0].prompt.splitlines()[-1])
    The capital of France is
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tunelens.backends.base import TokenBatch
from tunelens.errors import ConfigError, ShapeError, TaskError
from tunelens.tasks.base import Dataset, Example, answer_token_id, encode_prompts
from tunelens.tasks.facts import Fact, fact_prompt

LogitsFn = Callable[[TokenBatch], Float[Tensor, "batch pos d_vocab"]]


def _answers_by_relation(facts: Sequence[Fact]) -> dict[str, list[str]]:
    """The distinct answers of each relation, in order of first appearance."""
    answers: dict[str, list[str]] = {}
    for fact in facts:
        values = answers.setdefault(fact.relation, [])
        if fact.answer not in values:
            values.append(fact.answer)
    return answers


def _statement(fact: Fact, answer: str) -> str:
    """``"{fact_prompt} {answer}."``, e.g. ``"The capital of France is Paris."``."""
    return f"{fact_prompt(fact)} {answer}."


def known_by(
    model_logits_fn: LogitsFn,
    tokenizer,
    facts: Sequence[Fact],
    *,
    batch_size: int = 32,
) -> list[bool]:
    """Which facts the model completes correctly: greedy next token == the answer's first token.

    Args:
        model_logits_fn: maps a right-padded :class:`TokenBatch` to next-token logits
            ``[batch, pos, d_vocab]`` (e.g. ``loaded_model.logits``).
        tokenizer: the model's HF tokenizer.
        facts: the facts to test; prompts are :func:`~tunelens.tasks.facts.fact_prompt`.
        batch_size: prompts per forward pass.

    Returns:
        One flag per fact, in order.

    Raises:
        ConfigError: ``batch_size`` < 1.
        ShapeError: the logits are not ``[batch, pos, vocab]`` for the batch given.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    known: list[bool] = []
    for start in range(0, len(facts), batch_size):
        chunk = facts[start : start + batch_size]
        tokens = encode_prompts(tokenizer, [fact_prompt(fact) for fact in chunk])
        targets = torch.tensor([answer_token_id(tokenizer, " " + fact.answer) for fact in chunk])
        with torch.no_grad():
            logits = model_logits_fn(tokens)
        n, pos = tokens.input_ids.shape
        if logits.ndim != 3 or logits.shape[0] != n or logits.shape[1] != pos:
            raise ShapeError(
                f"model_logits_fn gave logits of shape {tuple(logits.shape)}; "
                f"expected [batch={n}, pos={pos}, vocab]"
            )
        rows = torch.arange(n, device=logits.device)
        top = logits[rows, tokens.last.to(logits.device)].argmax(dim=-1).cpu()
        known.extend((top == targets).tolist())
    return known


def true_false(facts: Sequence[Fact], seed: int, *, n_items: int | None = None) -> Dataset:
    """One true and one false statement per fact (true first), reproducibly from ``seed``.

    The prompt is ``f"{fact_prompt(fact)} {answer}."``; the false answer is drawn uniformly among the other
    distinct answers of the fact's relation in ``facts``. ``label`` is 1 (true) or 0 (false), ``answer`` is
    ``" " + the stated answer`` and ``candidates`` is empty. With ``n_items``, that many facts are sampled
    (seeded) and kept in input order.

    Raises:
        ConfigError: ``n_items`` < 1.
        TaskError: ``n_items`` exceeds the facts, or a relation has fewer than two distinct answers.
    """
    chosen = _sample(facts, seed, n_items)
    rng = random.Random(seed)
    answers = _answers_by_relation(facts)
    examples = []
    for fact in facts:
        others = sorted(a for a in answers[fact.relation] if a != fact.answer)
        if not others:
            raise TaskError(
                f"relation {fact.relation!r} has one distinct answer ({fact.answer!r}); a false statement "
                "needs another answer of the same relation"
            )
        wrong = rng.choice(others)
        if fact not in chosen:
            continue
        for stated, label in ((fact.answer, 1), (wrong, 0)):
            examples.append(
                Example(
                    prompt=_statement(fact, stated),
                    answer=" " + stated,
                    item_id=fact.item_id,
                    label=label,
                    meta={
                        "relation": fact.relation,
                        "subject": fact.subject,
                        "true_answer": fact.answer,
                        "stated_answer": stated,
                    },
                )
            )
    return Dataset(task="true_false", config={"seed": seed, "n_items": n_items}, examples=tuple(examples))


def _sample(facts: Sequence[Fact], seed: int, n_items: int | None) -> set[Fact]:
    """The facts to keep: all, or ``n_items`` of them sampled with ``random.Random(seed)``."""
    if not facts:
        raise TaskError("no facts given; expected at least one")
    if n_items is None:
        return set(facts)
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise ConfigError(f"n_items must be None (all) or an integer >= 1, got {n_items!r}")
    if n_items > len(facts):
        raise TaskError(f"n_items={n_items} asked, but only {len(facts)} facts were given")
    return set(random.Random(f"sample:{seed}").sample(list(facts), n_items))


def known_unknown(facts: Sequence[Fact], known: Sequence[bool]) -> Dataset:
    """The completion prompts labelled 1 (known) or 0 (unknown), e.g. from :func:`known_by`.

    Raises:
        TaskError: ``facts`` and ``known`` differ in length, or either class is empty.
    """
    if len(facts) != len(known):
        raise TaskError(f"got {len(facts)} facts but {len(known)} known flags; expected one flag per fact")
    flags = [bool(k) for k in known]
    n_known = sum(flags)
    if n_known == 0 or n_known == len(flags):
        raise TaskError(
            f"known/unknown needs both classes; got {n_known} known and {len(flags) - n_known} unknown "
            f"of {len(flags)} facts"
        )
    examples = tuple(
        Example(
            prompt=fact_prompt(fact),
            answer=" " + fact.answer,
            item_id=fact.item_id,
            label=int(flag),
            meta={"relation": fact.relation, "subject": fact.subject, "known": flag},
        )
        for fact, flag in zip(facts, flags, strict=True)
    )
    return Dataset(
        task="known_unknown",
        config={"n_known": n_known, "n_unknown": len(flags) - n_known},
        examples=examples,
    )


def misleading_context(facts: Sequence[Fact], seed: int, *, n_shots: int = 3) -> Dataset:
    """The WACK bad-shot prompt for every fact: ``n_shots`` wrong demonstrations, then the fact's prompt.

    Each shot is another fact of the same relation (another subject) stated with a wrong answer: drawn
    among the relation's distinct answers, different from the shot's true answer and from the target
    fact's answer (so the shots never hint at it). Shots and prompt are joined by newlines; the
    ``answer`` is the true answer, ``label`` is ``None``. ``meta["shots"]`` holds the shot sentences,
    ``meta["shot_subjects"]`` / ``meta["shot_answers"]`` / ``meta["shot_true_answers"]`` their parts.

    Raises:
        ConfigError: ``n_shots`` < 1.
        TaskError: a relation has fewer than ``n_shots + 1`` facts or fewer than 3 distinct answers.
    """
    if isinstance(n_shots, bool) or not isinstance(n_shots, int) or n_shots < 1:
        raise ConfigError(f"n_shots must be an integer >= 1, got {n_shots!r}")
    if not facts:
        raise TaskError("no facts given; expected at least one")
    rng = random.Random(seed)
    answers = _answers_by_relation(facts)
    by_relation: dict[str, list[Fact]] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    examples = []
    for fact in facts:
        pool = [other for other in by_relation[fact.relation] if other.subject != fact.subject]
        if len(pool) < n_shots or len(answers[fact.relation]) < 3:
            raise TaskError(
                f"relation {fact.relation!r} has {len(pool) + 1} facts and {len(answers[fact.relation])} "
                f"distinct answers; {n_shots} bad shots need at least {n_shots + 1} facts and 3 answers"
            )
        shots = rng.sample(pool, n_shots)
        wrong = [
            rng.choice(sorted(a for a in answers[fact.relation] if a not in (shot.answer, fact.answer)))
            for shot in shots
        ]
        sentences = tuple(_statement(shot, answer) for shot, answer in zip(shots, wrong, strict=True))
        examples.append(
            Example(
                prompt="\n".join([*sentences, fact_prompt(fact)]),
                answer=" " + fact.answer,
                item_id=fact.item_id,
                meta={
                    "relation": fact.relation,
                    "subject": fact.subject,
                    "shots": sentences,
                    "shot_subjects": tuple(shot.subject for shot in shots),
                    "shot_answers": tuple(wrong),
                    "shot_true_answers": tuple(shot.answer for shot in shots),
                },
            )
        )
    return Dataset(task="misleading", config={"seed": seed, "n_shots": n_shots}, examples=tuple(examples))
