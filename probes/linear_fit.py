"""The fitted affine probes every solver returns (logistic by L-BFGS or Newton, ridge, diff of means)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class LinearFit:
    """Affine probes ``x ↦ xW + b``, one per (layer, label set) (``k`` = 1 for a binary probe: the logit
    of class 1). With a single label set the ``target`` axis is absent: weight ``[layer, d_model, k]``."""

    weight: Float[Tensor, "layer ... d_model k"]
    bias: Float[Tensor, "layer ... k"]
    converged: Bool[Tensor, "layer ..."]
    n_iter: Int[Tensor, "layer ..."]
