"""Knowledge-conflict items for the context knob: held-out facts, both intents, first-token candidates.

A :class:`KnobItems` holds, per item, the prompts of the two intents (``context`` / ``prior``) and of the
instruction-free format (``none``), and the first-token ids of the two answers (column 0 = prior,
column 1 = context, as in :mod:`tunelens.tasks.context_knob`). Every analysis of the knob works on these.

Which items: the zoo's context-knob fine-tune trained on the ``train`` part of
:func:`tunelens.models.zoo.recipe_data`; its ``knob`` and ``test`` parts are facts the fine-tune never
saw. :func:`heldout_items` pools those two parts and re-splits them by fact into ``knob`` (layer search,
DAS training, calibration) and ``test`` (pair accuracy, DAS validation, steering), so the test part holds
at least 100 pairs.

Example:
    >>> from tunelens.tasks.context_knob import ContextKnobConfig, generate
    >>> from tunelens.tasks.facts import Fact
    >>> from tunelens.models.tiny import tiny_tokenizer
    >>> facts = [Fact(relation="capital", subject=s, answer=a) for s, a in [("the", "Box"), ("of", "cup")]]
    >>> ds = generate(ContextKnobConfig(relations=("capital",)), seed=0, facts=facts)
    >>> items = KnobItems.from_dataset(ds, tiny_tokenizer())
    >>> len(items), items.prompts("none")[0].splitlines()[0]
    (2, 'Context: The capital of the is cup.')
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from tunelens.backends.base import TokenBatch
from tunelens.errors import PromptError, TaskError
from tunelens.io import atomic_write_json
from tunelens.paths import data_home
from tunelens.tasks.base import Dataset, Example, answer_token_id, encode_prompts
from tunelens.tasks.context_knob import intent_pairs, render
from tunelens.tasks.facts import Fact, split_by_item

log = logging.getLogger(__name__)

Fmt = Literal["context", "prior", "none"]
FORMATS: tuple[str, ...] = ("context", "prior", "none")
PRIOR, CONTEXT = 0, 1
"""Columns of :attr:`KnobItems.candidates`."""


@dataclass(frozen=True, kw_only=True)
class KnobItems:
    """Items with both intents: prompts per format and the two answers' first tokens.

    ``candidates[i] = (prior answer id, context answer id)``; items whose two answers share a first token
    are never kept (first-token scoring could not tell them apart).
    """

    item_ids: tuple[str, ...]
    prompt_by_fmt: dict[str, tuple[str, ...]]
    candidates: Int[Tensor, "batch 2"]
    answers: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        missing = [f for f in ("context", "prior") if f not in self.prompt_by_fmt]
        if missing:
            raise PromptError(
                f"knob items need prompts of both intents ('context' and 'prior'); missing {missing}"
            )
        for fmt, prompts in self.prompt_by_fmt.items():
            if len(prompts) != n:
                raise PromptError(f"{len(prompts)} {fmt!r} prompts for {n} items; expected one per item")
        if tuple(self.candidates.shape) != (n, 2):
            raise PromptError(f"candidates must have shape ({n}, 2), got {tuple(self.candidates.shape)}")
        if n and (self.candidates[:, 0] == self.candidates[:, 1]).any():
            raise PromptError("an item's two answers share a first token; drop it before building KnobItems")

    def __len__(self) -> int:
        return len(self.item_ids)

    def prompts(self, fmt: Fmt) -> list[str]:
        if fmt not in self.prompt_by_fmt:
            raise PromptError(f"these items have no {fmt!r} prompts; formats: {list(self.prompt_by_fmt)}")
        return list(self.prompt_by_fmt[fmt])

    def encode(self, tokenizer, fmt: Fmt, max_len: int | None = None) -> TokenBatch:
        return encode_prompts(tokenizer, self.prompts(fmt), max_len=max_len)

    def required(self, intent: Literal["context", "prior"]) -> Int[Tensor, " batch"]:
        """The answer id each item's ``intent`` requires."""
        return self.candidates[:, CONTEXT if intent == "context" else PRIOR]

    def subset(self, index: Sequence[int] | Tensor) -> KnobItems:
        idx = [int(i) for i in index]
        return KnobItems(
            item_ids=tuple(self.item_ids[i] for i in idx),
            prompt_by_fmt={f: tuple(p[i] for i in idx) for f, p in self.prompt_by_fmt.items()},
            candidates=self.candidates[idx] if idx else self.candidates[:0],
            answers=tuple(self.answers[i] for i in idx),
        )

    def head(self, n: int | None) -> KnobItems:
        return self if n is None or n >= len(self) else self.subset(range(n))

    def split(self, fractions: dict[str, float], seed: int) -> dict[str, KnobItems]:
        """Split by item, reproducibly (see :func:`tunelens.tasks.facts.split_by_item`)."""
        parts = split_by_item(list(range(len(self))), fractions, seed, key=lambda i: self.item_ids[i])
        return {name: self.subset(idx) for name, idx in parts.items()}

    @classmethod
    def from_dataset(cls, dataset: Dataset, tokenizer) -> KnobItems:
        """Items of a ``context_knob`` data set (or any data set with its meta); the ``none`` prompt is
        rendered from the meta when the data set has none. Items sharing a first token are dropped.

        Raises:
            PromptError: the data set holds no item with both a context and a prior example.
        """
        try:
            pairs = intent_pairs(dataset)
        except TaskError as exc:
            raise PromptError(f"not a context-vs-prior data set: {exc}") from exc
        if not pairs:
            raise PromptError(
                f"the data set ({len(dataset)} examples) has no item with both a context and a prior "
                "example; the knob needs both intents of the same context and query"
            )
        none_by_item = {
            (e.item_id, e.meta.get("pair_index")): e.prompt
            for e in dataset.examples
            if e.meta.get("intent", "x") is None
        }
        ids, ctx, pri, non, cands, answers = [], [], [], [], [], []
        for c, p in pairs:
            ec, ep = dataset.examples[c], dataset.examples[p]
            prior_ans, ctx_ans = ec.meta["prior_answer"], ec.meta["context_answer"]
            cand = (answer_token_id(tokenizer, " " + prior_ans), answer_token_id(tokenizer, " " + ctx_ans))
            if cand[0] == cand[1]:
                continue
            key = (ec.item_id, ec.meta.get("pair_index"))
            none = none_by_item.get(key) or _none_prompt(ec)
            ids.append(ec.item_id)
            ctx.append(ec.prompt)
            pri.append(ep.prompt)
            non.append(none)
            cands.append(cand)
            answers.append((prior_ans, ctx_ans))
        return cls(
            item_ids=tuple(ids),
            prompt_by_fmt={"context": tuple(ctx), "prior": tuple(pri), "none": tuple(non)},
            candidates=torch.tensor(cands, dtype=torch.long).reshape(-1, 2),
            answers=tuple(answers),
        )


def _none_prompt(example: Example) -> str:
    m = example.meta
    if "relation" not in m or "subject" not in m:
        raise PromptError(
            f"example {example.item_id!r} has no relation/subject meta to render a 'none' prompt"
        )
    fact = Fact(relation=m["relation"], subject=m["subject"], answer=m["prior_answer"])
    return render(fact, m["context_answer"], None, "none")


# --- the held-out items of the zoo's knob fine-tune -----------------------------------------------------


def _cache_key(base, recipe_seed: int) -> str:
    """Everything the held-out set depends on: the base model's weights and tokenizer (which facts it
    knows, which answers are one token), the recipe's seed, and the code and data that generate and split
    the items (the facts table, the templates, the split, the tokenizer filter)."""
    import inspect

    from tunelens.models import zoo
    from tunelens.tasks import base as tasks_base
    from tunelens.tasks import context_knob, facts, knowledge

    h = hashlib.sha256(f"{base.content_hash}:{recipe_seed}".encode())
    vocab = base.tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items())).encode())
    for module in (context_knob, facts, knowledge, tasks_base):
        h.update(inspect.getsource(module).encode())
    h.update(inspect.getsource(zoo.recipe_data).encode())
    data_dir = Path(facts.__file__).parent / "data"
    for f in sorted(data_dir.rglob("*")) if data_dir.is_dir() else []:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _cache_file(key: str) -> Path:
    return data_home() / "cache" / "knob" / f"heldout-{key}.json"


def heldout_dataset(base, *, recipe_seed: int = 0) -> Dataset:
    """The context-knob examples the zoo's ``smollm2-knob-lora`` never trained on (its ``knob`` + ``test``).

    Computing the recipe asks the base model which facts it knows (about 40 s on a CPU); the result is
    cached on disk, keyed by everything it depends on (:func:`_cache_key`).
    """
    from tunelens.models import zoo

    path = _cache_file(_cache_key(base, recipe_seed))
    if path.is_file():
        doc = json.loads(path.read_text())
        return Dataset(
            task="context_knob",
            config=doc["config"],
            examples=tuple(Example(**{**e, "candidates": tuple(e["candidates"])}) for e in doc["examples"]),
        )
    recipe = zoo.TaskRecipe(task="context_knob", n=0, seed=recipe_seed)
    data = zoo.recipe_data(recipe, base)
    train_ids = {e.item_id for e in data["train"].examples}
    examples = data["knob"].examples + data["test"].examples
    if any(e.item_id in train_ids for e in examples):  # pragma: no cover - split_by_item guarantees it
        raise TaskError("a held-out knob item is also in the fine-tuning split")
    ds = Dataset(
        task="context_knob", config={**dict(data["test"].config), "parts": "knob+test"}, examples=examples
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        path,
        {
            "config": dict(ds.config),
            "examples": [
                {
                    "prompt": e.prompt,
                    "answer": e.answer,
                    "candidates": list(e.candidates),
                    "item_id": e.item_id,
                    "label": e.label,
                    "meta": dict(e.meta),
                }
                for e in ds.examples
            ],
        },
    )
    return ds


def heldout_items(base, *, seed: int = 0, test_fraction: float = 0.6) -> dict[str, KnobItems]:
    """``{"knob": …, "test": …}``: held-out items split by fact (``test_fraction`` of the facts to test)."""
    items = KnobItems.from_dataset(heldout_dataset(base), base.tokenizer)
    return items.split({"knob": 1 - test_fraction, "test": test_fraction}, seed=seed)
