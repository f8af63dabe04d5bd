"""Reading a model's answer at each prompt's last token: next-token logits, the logits of the prompt's
candidate answers, and accuracy restricted to those candidates.

One place for what fine-tuning, the zoo's evaluations, grafting, the app and the tests all read, on the
plain HF / peft module (no backend, no hooks).

Example (a tiny model, three prompts, their candidates)::

    >>> import torch
    >>> logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    >>> candidates = torch.tensor([[1, 2], [1, 2], [0, -1]])  # -1 pads a shorter candidate list
    >>> candidate_logits(logits, candidates)
    tensor([[2., 1.],
            [0., 1.],
            [0., -inf]])
    >>> picked(logits, candidates), answer_index(candidates, torch.tensor([1, 1, 0]))
    (tensor([1, 2, 0]), tensor([0, 0, 0]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tunelens.backends.base import TokenBatch
from tunelens.tasks.base import Encoded


def last_logits(
    model: nn.Module, tokens: TokenBatch, *, forward: Callable[..., Any] | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """Next-token logits at each prompt's last real token.

    Only the positions that are some prompt's last are unembedded (``logits_to_keep``): with Gemma's
    262k-token vocabulary the unembedding of every position costs more than the rest of the model.
    ``forward``: how to call the model (default ``model(**inputs)``; grafting passes a functional call with
    other parameters).
    """
    last = tokens.last
    keep, inverse = torch.unique(last, return_inverse=True)
    call = forward if forward is not None else model
    out = call(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, logits_to_keep=keep)
    return out.logits[torch.arange(len(last)), inverse]


def candidate_logits(
    logits: Float[Tensor, "batch d_vocab"], candidates: Int[Tensor, "batch k"]
) -> Float[Tensor, "batch k"]:
    """The logits of each prompt's candidate answers; ``-inf`` where ``candidates`` is padding (< 0)."""
    cand = candidates.to(logits.device)
    return logits.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))


def picked(
    logits: Float[Tensor, "batch d_vocab"], candidates: Int[Tensor, "batch k"]
) -> Int[Tensor, " batch"]:
    """The token id each prompt picks among its candidates (the candidate with the largest logit)."""
    best = candidate_logits(logits, candidates).argmax(1, keepdim=True)
    return candidates.to(logits.device).clamp(min=0).gather(1, best).squeeze(1)


def answer_index(candidates: Int[Tensor, "batch k"], answers: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
    """The position of each prompt's answer among its candidates (0 when it is not among them)."""
    return (candidates == answers[:, None].to(candidates.device)).float().argmax(1)


@torch.no_grad()
def answer_accuracy(model: nn.Module, enc: Encoded, batch_size: int = 64) -> tuple[float, float]:
    """(accuracy restricted to each example's candidates, full-vocabulary argmax accuracy)."""
    was_training = model.training
    model.eval()
    hits_r = hits_f = 0
    try:
        for start in range(0, len(enc), batch_size):
            part = enc.select(slice(start, start + batch_size))
            last = last_logits(model, part.tokens)
            hits_r += (picked(last, part.candidate_ids) == part.answer_ids).sum().item()
            hits_f += (last.argmax(1) == part.answer_ids).sum().item()
    finally:
        model.train(was_training)
    return hits_r / len(enc), hits_f / len(enc)
