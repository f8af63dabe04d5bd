"""Shared set-up for the benchmarks: a cheap SmolLM2 pair and entity-tracking prompts.

The pair needs no training: ``tuned`` is a second copy of the zoo's SmolLM2 whose weights are scaled by
``1 + 1e-3 * noise``, so it is a distinct model (its own content hash) with the same sizes and tokenizer.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from tunelens.models import zoo
from tunelens.models.pair import ModelPair
from tunelens.tasks.base import Dataset
from tunelens.tasks.entity_tracking import EntityTrackingConfig, generate


def perturbed_pair(name: str = "smollm2", scale: float = 1e-3, seed: int = 0) -> ModelPair:
    """``(zoo model, the same model with slightly perturbed weights)`` as a :class:`ModelPair`."""
    base = zoo.load(name)
    tuned = zoo.load(name)
    tuned.name = f"{name}-perturbed"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.module.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
    return ModelPair(base, tuned, name=f"{name} vs perturbed")


def gpt2_shape_pair(scale: float = 1e-2, seed: int = 0) -> ModelPair:
    """A random-init GPT-2 of realistic shape (12 layers, d_model 768, 12 heads; Conv1D and a fused c_attn)
    with SmolLM2's tokenizer, and a perturbed copy: the fused-projection path at a real size, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunelens.models.loaded import LoadedModel, ModelSource

    tok = zoo.load("smollm2").tokenizer
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=1024, n_embd=768, n_layer=12, n_head=12,
        architectures=["GPT2LMHeadModel"], attn_implementation="eager",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    base = GPT2LMHeadModel(cfg).eval()
    tuned = GPT2LMHeadModel(cfg).eval()
    tuned.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=gen))

    def loaded(module, name):
        return LoadedModel(module, tok, source=ModelSource(kind="memory", location=name), name=name)

    return ModelPair(loaded(base, "gpt2-shape"), loaded(tuned, "gpt2-shape-perturbed"), name="gpt2-shape")


def prompts(n: int, seed: int = 0) -> Dataset:
    """``n`` entity-tracking prompts (3 boxes, every box of ``ceil(n / 3)`` worlds queried)."""
    ds = generate(EntityTrackingConfig(n_boxes=3, n_contexts=math.ceil(n / 3)), seed=seed)
    return ds.subset(range(n))


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over repeats of ``times[r] / baseline[r]``: slow drifts in machine load cancel out."""
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))
