"""Direction: a unit vector at a site, in raw activation space — the shared currency of probes, the knob
and the atlas — and the difference of means that finds the simplest one.

A direction always lives in the space of the activations it was read from (no standardisation folded
in), so a probe's weights, a knob found by DAS and a singular vector of a weight matrix writing into the
same residual stream can be compared by a cosine.

Example:
    >>> import torch
    >>> from tunelens.directions import diff_of_means
    >>> from tunelens.sites import Site
    >>> acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    >>> d = diff_of_means(acts, torch.tensor([1, 1, 0, 0]), site=Site("resid_post", 0))
    >>> d.vector.tolist(), round(d.scale, 3)
    ([0.7071067690849304, -0.7071067690849304], 2.828)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tunelens.errors import ShapeError
from tunelens.sites import Site


@dataclass(frozen=True, kw_only=True)
class Direction:
    """A unit vector ``vector`` at ``site`` of the model with content hash ``model``.

    ``scale`` is the length of the vector before normalisation (e.g. the distance between the class
    means), ``meta`` says how it was found.
    """

    site: Site
    vector: Float[Tensor, " d"]
    model: str = ""
    name: str = ""
    scale: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = self.vector
        if not isinstance(v, Tensor) or v.ndim != 1 or v.numel() == 0:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ShapeError(f"a Direction needs a non-empty 1-d vector, got {got}")
        if not torch.isfinite(v).all():
            raise ShapeError(f"direction {self.name or self.site} has NaN or Inf entries")
        norm = v.norm()
        if norm == 0:
            raise ShapeError(f"direction {self.name or self.site} is the zero vector")
        object.__setattr__(self, "vector", (v / norm).detach().float().cpu())

    @property
    def width(self) -> int:
        return self.vector.numel()

    def check_width(self, width: int, what: str = "activations") -> None:
        if width != self.width:
            raise ShapeError(
                f"direction {self.name or self.site} has width {self.width}, but the {what} have "
                f"width {width}"
            )

    def project(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
        """``uᵀh`` for every activation ``h`` (last axis)."""
        self.check_width(acts.shape[-1])
        return acts.float() @ self.vector.to(acts.device)

    def cosine(self, other: Direction | Tensor) -> float:
        """Cosine with another direction or vector of the same width (sign kept)."""
        v = other.vector if isinstance(other, Direction) else other.detach().float().cpu().reshape(-1)
        self.check_width(v.numel(), "other vector")
        return float(self.vector @ v / v.norm().clamp_min(1e-12))


def class_means(acts: Float[Tensor, "batch d"], labels: Tensor) -> tuple[Tensor, Float[Tensor, "n_class d"]]:
    """The distinct labels (sorted) and the mean activation of each."""
    if acts.ndim != 2 or labels.ndim != 1 or labels.shape[0] != acts.shape[0]:
        raise ShapeError(
            f"expected activations [batch, d] and labels [batch]; got {tuple(acts.shape)} and "
            f"{tuple(labels.shape)}"
        )
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(classes), acts.shape[1], dtype=torch.float64).index_add_(0, inverse, acts.double())
    counts = torch.bincount(inverse, minlength=len(classes)).double()
    return classes, (sums / counts[:, None]).float()


def diff_of_means(
    acts: Float[Tensor, "batch d"], labels: Tensor, *, site: Site, model: str = "", name: str = ""
) -> Direction:
    """The direction from the mean of label 0 (the smaller label) to the mean of label 1 (the larger).

    Labels must take exactly two values; ``scale`` is the distance between the two means.
    """
    classes, means = class_means(acts, labels)
    if len(classes) != 2:
        raise ShapeError(
            f"difference of means needs exactly two classes, got {len(classes)}: {classes.tolist()}"
        )
    delta = means[1] - means[0]
    return Direction(
        site=site, vector=delta, model=model, name=name or f"diff-of-means@{site}", scale=float(delta.norm()),
        meta={"method": "diff_of_means", "classes": classes.tolist(), "n": int(labels.shape[0])},
    )  # fmt: skip
