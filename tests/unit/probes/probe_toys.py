"""Toy probe data: activations [layer, batch, d] where the answer is known by construction."""

from __future__ import annotations

import torch


def make_toy(n=600, d=16, n_layer=3, n_classes=2, seed=0, signal_layer=1, noise=1.0):
    """Class ``y`` is written along fixed random directions at ``signal_layer`` only; items come in pairs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = noise * torch.randn(n_layer, n, d, generator=g) + 3.0  # an offset, so raw != standardised
    means = 2.0 * torch.randn(n_classes, d, generator=g)
    x[signal_layer] += means[y]
    items = [f"item{i // 2}" for i in range(n)]
    return x, y, items
