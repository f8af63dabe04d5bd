"""Fixtures for the circuits tests: a tiny model trained on induction, and induction prompts."""

from __future__ import annotations

import pytest
import torch

from tunelens.backends.base import TokenBatch
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.tiny import TinyConfig, pretrain_induction, tiny_llama
from tunelens.tasks.base import Encoded


def induction_ids(tok) -> torch.Tensor:
    from tunelens.tasks.entity_tracking import OBJECTS

    vocab = tok.get_vocab()
    return torch.tensor([vocab[w] for w in OBJECTS])


@pytest.fixture(scope="session")
def induction_model(tiny_tok) -> LoadedModel:
    """2 layers, 4 query / 2 KV heads, trained on random 16-token sequences repeated once.

    With a fixed period the model may copy by relative position rather than by induction; either way the
    clean and corrupt runs below differ strongly, which is what the patching tests need.
    """
    torch.manual_seed(0)
    model = tiny_llama(
        TinyConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2), len(tiny_tok.get_vocab()), 0
    )
    pretrain_induction(model, induction_ids(tiny_tok), steps=150, seed=0, lr=3e-3)
    return LoadedModel(model, tiny_tok, source=ModelSource(kind="memory", location="tiny-induction"))


def induction_data(tok, n: int = 6, half: int = 16, seed: int = 0) -> tuple[Encoded, Encoded]:
    """Clean ``x1..xh x1..x(h-1)`` (answer ``xh``) and corrupt ``y1..yh x1..x(h-1)`` (answer ``yh``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = induction_ids(tok)
    xs = ids[torch.stack([torch.randperm(len(ids), generator=gen)[: 2 * half] for _ in range(n)])]
    x, y = xs[:, :half], xs[:, half:]
    clean = torch.cat([x, x[:, :-1]], dim=1)
    corrupt = torch.cat([y, x[:, :-1]], dim=1)
    mask = torch.ones_like(clean)
    last = torch.full((n,), clean.shape[1] - 1)

    def enc(t, answer, foil):
        return Encoded(
            tokens=TokenBatch(input_ids=t, attention_mask=mask),
            answer_ids=answer,
            candidate_ids=torch.stack([answer, foil], dim=1),
            positions={"last": last, "prev": torch.full((n,), half - 1)},
        )

    return enc(clean, x[:, -1], y[:, -1]), enc(corrupt, y[:, -1], x[:, -1])
