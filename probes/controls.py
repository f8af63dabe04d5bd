"""Baselines a probe score is read against: the Hewitt–Liang control task and shuffled labels.

*Control task* (Hewitt & Liang 2019): every *type* (a key that recurs across items, e.g. the queried box
letter, or the subject of a fact) gets a random label drawn once from the empirical label distribution,
and every example of that type keeps it. A probe can only score on it by memorising types, so
``selectivity = task score − control score`` says how much of the score is more than memorisation.
With ``types`` equal to the items the split keeps together, test types are never seen in training and
the control sits at chance by construction; pass a type key that recurs across items to make it bite.

*Shuffled labels*: the training labels permuted (the test labels left true); the probe learns nothing
real, so its score is the chance level as measured, not assumed.

Example:
    >>> import torch
    >>> y = torch.tensor([0, 1, 0, 1, 1, 0])
    >>> c = control_labels(["a", "b", "a", "c", "b", "c"], y, seed=0)
    >>> bool(c[0] == c[2]) and bool(c[1] == c[4])
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def control_labels(types: Sequence[str], y: Tensor, *, seed: int) -> Tensor:
    """One random label per distinct type (drawn from ``y``'s empirical distribution), broadcast to examples.

    Integer ``y`` (class ids) draws classes with their frequencies; float ``y`` (ridge targets) draws
    values of ``y``. Sorted types and ``seed`` fix the draw, so it does not depend on example order.
    """
    rng = np.random.default_rng([seed, 0x48_4C])  # "HL"
    uniq = sorted(set(types))
    pool = y.cpu().numpy()
    drawn = pool[rng.integers(0, len(pool), size=len(uniq))]
    of_type = dict(zip(uniq, drawn.tolist(), strict=True))
    return torch.tensor([of_type[t] for t in types], dtype=y.dtype)


def shuffled_labels(y: Tensor, *, seed: int) -> Tensor:
    """``y`` permuted with a seeded generator."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return y[torch.randperm(len(y), generator=g)]
