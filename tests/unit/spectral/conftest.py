"""Fixtures for the weight-space tests: tiny pairs whose fine-tune changed only graftable parameters."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_tiny
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.weights import trainable_params


def perturbed(base: LoadedModel, scale: float, seed: int, name: str) -> LoadedModel:
    """A copy of ``base`` whose linear matrices and norm weights (not embeddings) moved by ``scale``."""
    module = copy.deepcopy(base.module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_params(module, include_norms=True).values():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return LoadedModel(module, base.tokenizer, source=ModelSource(kind="memory", location=name), name=name)


@pytest.fixture(scope="module")
def graft_pair(tiny_tok) -> ModelPair:
    base = make_tiny(tiny_tok, name="tiny-base")
    return ModelPair(base, perturbed(base, 0.05, seed=1, name="tiny-tuned"))
