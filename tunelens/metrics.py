"""Metrics shared by the analyses: accuracy, AUROC, expected calibration error, confidence intervals.

All take torch tensors and return Python floats (or tensors for batched forms), and are checked against
scikit-learn in the tests.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from tunelens.errors import ShapeError


def _check_same_length(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ShapeError(f"{what}: {a.shape[0]} scores but {b.shape[0]} labels")
    if a.shape[0] == 0:
        raise ShapeError(f"{what}: no items")


def accuracy(pred: Tensor, labels: Tensor) -> float:
    _check_same_length(pred, labels, "accuracy")
    return float((pred == labels).float().mean())


def auroc(scores: Float[Tensor, " batch"], labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive); ties count one half."""
    _check_same_length(scores, labels, "auroc")
    return float(auroc_rows(scores[None], labels)[0])


def ece(probs: Float[Tensor, "batch n_class"], labels: Tensor, *, n_bins: int = 10) -> float:
    """Expected calibration error of the top-class confidence, equal-width bins on [0, 1]."""
    if probs.ndim != 2:
        raise ShapeError(f"ece expects probabilities [batch, n_class], got {tuple(probs.shape)}")
    _check_same_length(probs, labels, "ece")
    return float(ece_rows(probs[None], labels, n_bins=n_bins)[0])


def auroc_rows(scores: Float[Tensor, "row batch"], labels: Tensor) -> Float[Tensor, " row"]:
    """:func:`auroc` of every row of ``scores`` against the same ``labels``, in one batched pass."""
    if scores.ndim != 2:
        raise ShapeError(f"auroc_rows expects scores [row, batch], got {tuple(scores.shape)}")
    _check_same_length(scores.T, labels, "auroc_rows")
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ShapeError(f"auroc needs both classes, got {n_pos} positive and {n_neg} negative labels")
    x = scores.double().contiguous()
    ordered = x.sort(-1).values
    # the average 1-based rank of a value: (#smaller + #smaller-or-equal + 1) / 2, ties sharing it
    below = torch.searchsorted(ordered, x, right=False)
    upto = torch.searchsorted(ordered, x, right=True)
    ranks = (below + upto + 1).double() / 2
    return (ranks[:, labels].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def ece_rows(
    probs: Float[Tensor, "row batch n_class"], labels: Tensor, *, n_bins: int = 10
) -> Float[Tensor, " row"]:
    """:func:`ece` of every row of ``probs`` against the same ``labels``, in one batched pass."""
    if probs.ndim != 3:
        raise ShapeError(f"ece_rows expects probabilities [row, batch, n_class], got {tuple(probs.shape)}")
    _check_same_length(probs.transpose(0, 1), labels, "ece_rows")
    conf, pred = probs.double().max(dim=-1)
    correct = (pred == labels).double()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    # Σ_bins (n_b / n)·|mean conf_b − mean correct_b| = Σ_bins |Σ_b (conf − correct)| / n
    gap = torch.zeros(probs.shape[0], n_bins, dtype=torch.float64).scatter_add_(1, bins, conf - correct)
    return gap.abs().sum(-1) / probs.shape[1]


def mean_ci(
    values: list[float] | Tensor, *, z: float = 1.96, bounds: tuple[float, float] | None = None
) -> tuple[float, float, float]:
    """Mean and a normal-approximation confidence interval (mean ± z·sd/√n) over seeds or items;
    ``bounds``: the range of the measure (an accuracy's (0, 1)), which the interval is clipped to."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        raise ShapeError("mean_ci needs at least one value")
    mean = float(v.mean())
    if v.numel() == 1:
        return mean, mean, mean
    half = z * float(v.std(unbiased=True)) / math.sqrt(v.numel())
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return mean, lo, hi


def binomial_ci(p: float, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for an accuracy ``p`` measured on ``n`` items."""
    if n <= 0:
        raise ShapeError(f"binomial_ci needs n > 0 items, got {n}")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def bootstrap_means(
    values: Float[Tensor, "stat item"],
    groups: list[str] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> Float[Tensor, "boot stat"]:
    """Means of each row of ``values`` over ``n_boot`` resamples of the items (columns), drawn with
    replacement; with ``groups`` (one label per item), whole groups are drawn (a cluster bootstrap: for
    entity tracking, all queries of one world together, as they are not independent).

    Every row is resampled with the *same* draws, so a statistic of several rows (a difference, a ratio)
    keeps their correlation. Returns ``[n_boot, n_rows]`` float64.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[1] == 0:
        raise ShapeError(f"bootstrap_means expects values [stat, item] with items, got {tuple(v.shape)}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ShapeError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if groups is None:
        index = torch.arange(v.shape[1])
    else:
        if len(groups) != v.shape[1]:
            raise ShapeError(f"groups has {len(groups)} labels for {v.shape[1]} items")
        names = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        index = torch.tensor([names[g] for g in groups])
    n_groups = int(index.max()) + 1
    sums = torch.zeros(v.shape[0], n_groups, dtype=torch.float64).index_add_(1, index, v)
    sizes = torch.zeros(n_groups, dtype=torch.float64).index_add_(
        0, index, torch.ones(v.shape[1], dtype=torch.float64)
    )
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_groups, (n_boot, n_groups), generator=gen)
    counts = torch.zeros(n_boot, n_groups, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_boot, n_groups, dtype=torch.float64)
    )
    return (counts @ sums.T) / (counts @ sizes)[:, None]


def percentile_ci(samples: Tensor, *, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``samples`` (NaNs, a ratio over a zero gap, dropped)."""
    s = torch.as_tensor(samples, dtype=torch.float64).reshape(-1)
    s = s[~s.isnan()]
    if s.numel() == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    q = torch.quantile(s, torch.tensor([a, 1 - a], dtype=torch.float64))
    return float(q[0]), float(q[1])
