"""The seeded train/test split of a probe, by item (an item's examples never straddle the split).

It is :func:`tunelens.tasks.facts.split_by_item` — the split every task's :meth:`Dataset.split` uses —
applied to example indices.

Example:
    >>> tr, te = split_indices(["a", "a", "b", "c", "d"], test_fraction=0.5, seed=0)
    >>> sorted(tr.tolist() + te.tolist())
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tunelens.errors import ConfigError
from tunelens.tasks.facts import split_by_item


def split_indices(items: Sequence[str], *, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of the training and test examples."""
    n_items = len(set(items))
    if n_items < 2:
        raise ConfigError(f"a probe split needs at least 2 distinct items, got {n_items}")
    parts = split_by_item(
        list(range(len(items))),
        {"train": 1 - test_fraction, "test": test_fraction},
        seed,
        key=lambda i: items[i],
    )
    if not parts["train"] or not parts["test"]:
        raise ConfigError(
            f"test_fraction={test_fraction} of {n_items} items leaves an empty train or test split"
        )
    return torch.tensor(parts["train"], dtype=torch.long), torch.tensor(parts["test"], dtype=torch.long)
