"""Data sets of prompts with answers, and their encoding for one tokenizer.

A task generates a :class:`Dataset` from a seed. Each :class:`Example` carries its prompt, the answer
continuation (with its leading space), the candidate answers among which restricted accuracy is
measured, an ``item_id`` that splits keep together, an optional probe ``label``, and named *marks*:
character offsets in the prompt (e.g. the query's box label) that :meth:`Dataset.encode` turns into
token positions for the tokenizer at hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tunelens.backends.base import TokenBatch
from tunelens.errors import ConfigError, PromptError, TaskError
from tunelens.tasks.facts import split_by_item


@dataclass(frozen=True, kw_only=True)
class Example:
    """One prompt and what a correct model says next."""

    prompt: str
    answer: str
    candidates: tuple[str, ...] = ()
    item_id: str = ""
    label: int | float | str | None = None
    marks: Mapping[str, int] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """A data set encoded for one tokenizer: tokens, answer ids and positions, all batch-aligned."""

    tokens: TokenBatch
    answer_ids: Int[Tensor, " batch"]
    candidate_ids: Int[Tensor, "batch n_candidates"]
    positions: dict[str, Int[Tensor, " batch"]]

    def __len__(self) -> int:
        return len(self.tokens)

    def position(self, name: str, *, also: Sequence[str] = ()) -> Int[Tensor, " batch"]:
        """The token index of the named position in every prompt.

        Raises ConfigError for a name the task does not define (``also``: other names the caller
        accepts, listed in the message) and PromptError when a prompt lacks that mark.
        """
        if name not in self.positions:
            others = f" or {', '.join(map(repr, also))}" if also else ""
            raise ConfigError(
                f"unknown position: position {name!r} is not defined by this task; "
                f"it has {sorted(self.positions)}{others}"
            )
        pos = self.positions[name]
        if (pos < 0).any():
            i = int((pos < 0).nonzero()[0])
            raise PromptError(f"example {i} has no {name!r} position (its prompt lacks that mark)")
        return pos

    def select(self, index: slice | Tensor) -> Encoded:
        return Encoded(
            tokens=self.tokens.select(index),
            answer_ids=self.answer_ids[index],
            candidate_ids=self.candidate_ids[index],
            positions={k: v[index] for k, v in self.positions.items()},
        )


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """An ordered, hashable collection of examples of one task."""

    task: str
    config: Mapping[str, Any]
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    @property
    def labels(self) -> list[Any]:
        return [e.label for e in self.examples]

    def content_hash(self) -> str:
        """sha256 over the config and every example: names exactly the data an analysis saw."""
        h = hashlib.sha256(
            json.dumps({"task": self.task, "config": dict(self.config)}, sort_keys=True).encode()
        )
        for e in self.examples:
            h.update(json.dumps([e.prompt, e.answer, list(e.candidates), e.item_id, e.label]).encode())
        return h.hexdigest()[:16]

    def subset(self, indices: Sequence[int]) -> Dataset:
        return replace(self, examples=tuple(self.examples[i] for i in indices))

    def split(self, fractions: Mapping[str, float], seed: int) -> dict[str, Dataset]:
        """Split by ``item_id`` (an item is never in two parts), reproducibly from ``seed``."""
        parts = split_by_item(list(range(len(self))), fractions, seed, key=lambda i: self.examples[i].item_id)
        return {name: self.subset(idx) for name, idx in parts.items()}

    def encode(self, tokenizer, *, max_len: int | None = None) -> Encoded:
        """Tokenize (right padding), look up answer and candidate ids, and turn marks into positions."""
        return encode_examples(self.examples, tokenizer, max_len=max_len)


def answer_token_id(tokenizer, text: str) -> int:
    """The first token of ``text`` as a continuation (``text`` keeps its leading space)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TaskError(f"answer {text!r} encodes to no tokens")
    return ids[0]


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_len: int | None = None) -> TokenBatch:
    """Right-padded token ids of ``prompts``; empty lists, empty prompts and over-long prompts are errors."""
    if len(prompts) == 0:
        raise PromptError("expected at least one prompt, got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"prompt {i} is empty; expected non-empty text, got {p!r}")
    enc = tokenizer(list(prompts), add_special_tokens=True)
    ids = enc["input_ids"]
    longest = max(len(x) for x in ids)
    if max_len is not None and longest > max_len:
        i = max(range(len(ids)), key=lambda j: len(ids[j]))
        raise PromptError(
            f"prompt {i} has {longest} tokens; this model's context is {max_len} tokens. Shorten the prompt."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(ids), longest), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return TokenBatch(input_ids=input_ids, attention_mask=mask)


def encode_examples(examples: Sequence[Example], tokenizer, *, max_len: int | None = None) -> Encoded:
    tokens = encode_prompts(tokenizer, [e.prompt for e in examples], max_len=max_len)
    answer_ids = torch.tensor([answer_token_id(tokenizer, e.answer) for e in examples], dtype=torch.long)
    n_cand = max((len(e.candidates) for e in examples), default=0)
    cand = torch.full((len(examples), max(n_cand, 1)), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        for j, c in enumerate(e.candidates or (e.answer,)):
            cand[i, j] = answer_token_id(tokenizer, c)
    positions = {"last": tokens.last.clone()}
    names = sorted({k for e in examples for k in e.marks})
    if names:
        offsets = tokenizer(
            [e.prompt for e in examples], add_special_tokens=True, return_offsets_mapping=True
        )
        for name in names:
            pos = torch.full((len(examples),), -1, dtype=torch.long)
            for i, e in enumerate(examples):
                if name in e.marks:
                    pos[i] = _token_at(offsets["offset_mapping"][i], e.marks[name], e.prompt, name)
            positions[name] = pos
    return Encoded(tokens=tokens, answer_ids=answer_ids, candidate_ids=cand, positions=positions)


def _token_at(offsets: Sequence[tuple[int, int]], char: int, prompt: str, name: str) -> int:
    for t, (start, end) in enumerate(offsets):
        if start <= char < end:
            return t
    raise TaskError(f"mark {name!r} at character {char} of {prompt!r} falls on no token")
