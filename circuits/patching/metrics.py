"""Patching metrics, read from the last-position logits of a run: logit difference, answer probability,
accuracy, and the normalised recovery ``(patched − target) / (source − target)``.

A sweep never keeps full-vocabulary logits: for every run it keeps the logits of the few token ids a
metric reads (:class:`Answers`), the log-partition function and the arg-max, in a :class:`LastLogits`.

Example:
    >>> import torch
    >>> answers = Answers(answer=torch.tensor([2]), foil=torch.tensor([0]))
    >>> last = LastLogits.from_logits(torch.tensor([[0.0, 1.0, 3.0]]), answers)
    >>> round(float(logit_diff(last)[0]), 3), round(float(answer_prob(last)[0]), 3)
    (3.0, 0.844)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tunelens.errors import ShapeError, TaskError
from tunelens.tasks.base import Encoded

MetricName = Literal["logit_diff", "prob", "accuracy"]
METRICS: tuple[str, ...] = get_args(MetricName)


@dataclass(frozen=True, kw_only=True)
class Answers:
    """The token ids a metric reads, per prompt: the ``answer``, an optional ``foil`` (the answer of the
    other run, for a logit difference) and optional ``candidates`` (for restricted accuracy; ``-1`` pads)."""

    answer: Int[Tensor, " batch"]
    foil: Int[Tensor, " batch"] | None = None
    candidates: Int[Tensor, "batch k"] | None = None

    def __post_init__(self) -> None:
        n = self.answer.shape[0]
        for name in ("foil", "candidates"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != n:
                raise ShapeError(f"Answers.{name} has {t.shape[0]} rows, expected {n} (one per prompt)")
        if (self.answer < 0).any():
            raise TaskError("every prompt needs an answer token (got -1); this task has no answers")

    def __len__(self) -> int:
        return self.answer.shape[0]

    @property
    def ids(self) -> Int[Tensor, "batch k"]:
        """All ids to keep: answer, foil (or answer again), candidates (padding replaced by the answer)."""
        cols = [self.answer[:, None], (self.foil if self.foil is not None else self.answer)[:, None]]
        if self.candidates is not None:
            cols.append(torch.where(self.candidates < 0, self.answer[:, None], self.candidates))
        return torch.cat(cols, dim=1)

    def select(self, index: Tensor) -> Answers:
        return Answers(
            answer=self.answer[index],
            foil=None if self.foil is None else self.foil[index],
            candidates=None if self.candidates is None else self.candidates[index],
        )

    @classmethod
    def from_encoded(cls, data: Encoded, foil: Encoded | None = None) -> Answers:
        """Answers of a task's encoded data; ``foil``: the counterfactual data whose answers compete."""
        if data.answer_ids is None or data.answer_ids.numel() == 0:
            raise TaskError("a patching metric needs a task with answers; this data set has none")
        return cls(
            answer=data.answer_ids,
            foil=None if foil is None else foil.answer_ids,
            candidates=data.candidate_ids,
        )


@dataclass(frozen=True, kw_only=True)
class LastLogits:
    """What a metric needs from the last-position logits of ``runs × batch`` runs (leading dims free)."""

    selected: Float[Tensor, "... k"]  # logits of Answers.ids
    lse: Float[Tensor, "..."]  # logsumexp over the vocabulary
    top: Float[Tensor, "..."]  # largest logit over the vocabulary
    has_foil: bool
    n_candidates: int
    candidate_valid: Tensor | None  # batch k (False where the candidate was padding)
    candidate_is_answer: Tensor | None = None  # batch k: the candidate *is* the answer token

    @classmethod
    def from_logits(cls, logits: Float[Tensor, "... batch d_vocab"], answers: Answers) -> LastLogits:
        ids = answers.ids.to(logits.device)
        sel = torch.gather(logits, -1, ids.expand(*logits.shape[:-2], *ids.shape))
        return cls(
            selected=sel.float(),
            lse=torch.logsumexp(logits.float(), dim=-1),
            top=logits.amax(dim=-1).float(),
            has_foil=answers.foil is not None,
            n_candidates=0 if answers.candidates is None else answers.candidates.shape[1],
            candidate_valid=None if answers.candidates is None else answers.candidates >= 0,
            candidate_is_answer=None
            if answers.candidates is None
            else answers.candidates == answers.answer[:, None],
        )

    @classmethod
    def stack(cls, parts: list[LastLogits], dim: int = 0) -> LastLogits:
        first = parts[0]
        return cls(
            selected=torch.cat([p.selected for p in parts], dim),
            lse=torch.cat([p.lse for p in parts], dim),
            top=torch.cat([p.top for p in parts], dim),
            has_foil=first.has_foil,
            n_candidates=first.n_candidates,
            candidate_valid=first.candidate_valid,
            candidate_is_answer=first.candidate_is_answer,
        )

    def index(self, i: int | slice) -> LastLogits:
        """The runs at index ``i`` of the leading axis (an int drops it; ``slice(j, j + 1)`` keeps it)."""
        return replace(self, selected=self.selected[i], lse=self.lse[i], top=self.top[i])

    def _candidates(self) -> Tensor:
        if self.n_candidates == 0:
            raise TaskError("this metric needs candidate answers; the data set has none")
        cand = self.selected[..., 2:]
        return cand.masked_fill(~self.candidate_valid.to(cand.device), float("-inf"))


def logit_diff(last: LastLogits) -> Tensor:
    """``logit(answer) − logit(foil)``; without a foil, minus the best *other* candidate (other by token, not
    by value: in bfloat16 another candidate often ties with the answer, and then the difference is 0)."""
    answer = last.selected[..., 0]
    if last.has_foil:
        return answer - last.selected[..., 1]
    cand = last._candidates()
    others = cand.masked_fill(last.candidate_is_answer.to(cand.device), float("-inf")).amax(dim=-1)
    return answer - others


def answer_prob(last: LastLogits) -> Tensor:
    """Softmax probability of the answer over the whole vocabulary."""
    return torch.exp(last.selected[..., 0] - last.lse)


def accuracy(last: LastLogits) -> Tensor:
    """1 where the answer wins: among the candidates if there are any, else over the whole vocabulary."""
    if last.n_candidates == 0:
        return (last.selected[..., 0] >= last.top).float()
    cand = last._candidates()
    return (cand.amax(dim=-1) <= last.selected[..., 0]).float()


def metric_values(last: LastLogits) -> dict[str, Tensor]:
    """Every metric, per run (leading dims kept)."""
    out = {"logit_diff": logit_diff(last), "prob": answer_prob(last), "accuracy": accuracy(last)}
    if not last.has_foil and last.n_candidates == 0:
        del out["logit_diff"]  # no competitor to subtract
    return out


def normalised(patched: Tensor, source: float, target: float) -> Tensor:
    """``(patched − target) / (source − target)``: 0 = no effect, 1 = the source run's value restored."""
    gap = source - target
    if abs(gap) < 1e-12:
        return torch.full_like(patched, float("nan"))
    return (patched - target) / gap
