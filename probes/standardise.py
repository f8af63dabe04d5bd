"""Per-layer standardisation fitted on the training split, and the way back to raw activation space.

A probe is trained on ``(x - mean) / scale``; its weights ``w`` and bias ``b`` there are the raw-space
affine map ``x ↦ x·(w / scale) + (b - (mean / scale)·w)``. Raw-space weights are what a
:class:`tunelens.directions.Direction` holds and what is compared across models.

Example:
    >>> import torch
    >>> x = torch.tensor([[[0.0, 10.0], [2.0, 30.0]]])  # [layer, batch, d]
    >>> st = Standardiser.fit(x)
    >>> st.apply(x).tolist()
    [[[-1.0, -1.0], [1.0, 1.0]]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class Standardiser:
    """Mean and scale (population standard deviation, 1 where a feature is constant) per layer, float64."""

    mean: Float[Tensor, "layer d_model"]
    scale: Float[Tensor, "layer d_model"]

    @classmethod
    def fit(cls, x: Float[Tensor, "layer batch d_model"]) -> Standardiser:
        var, mean = torch.var_mean(x, 1, correction=0)
        mean, std = mean.double(), var.double().sqrt()
        # the same rule as scikit-learn's StandardScaler: a (near-)constant feature keeps scale 1
        tiny = std <= 10 * torch.finfo(x.dtype).eps * mean.abs().clamp_min(1.0)
        return cls(mean=mean, scale=torch.where(tiny, torch.ones_like(std), std))

    def apply(self, x: Float[Tensor, "layer batch d_model"]) -> Float[Tensor, "layer batch d_model"]:
        """Standardised ``x``, in the dtype of ``x``."""
        return (x - self.mean[:, None].to(x.dtype)) / self.scale[:, None].to(x.dtype)

    def to_raw(
        self, w: Float[Tensor, "layer d_model k"], b: Float[Tensor, "layer k"]
    ) -> tuple[Float[Tensor, "layer d_model k"], Float[Tensor, "layer k"]]:
        """Weights on standardised inputs -> the same affine map on raw activations."""
        w_raw = w / self.scale[:, :, None]
        return w_raw, b - torch.einsum("ld,ldk->lk", self.mean, w_raw)

    def from_raw(
        self, w_raw: Float[Tensor, "layer d_model k"], b_raw: Float[Tensor, "layer k"]
    ) -> tuple[Float[Tensor, "layer d_model k"], Float[Tensor, "layer k"]]:
        """Raw-space affine map -> the same map on inputs standardised by this standardiser."""
        return w_raw * self.scale[:, :, None], b_raw + torch.einsum("ld,ldk->lk", self.mean, w_raw)
