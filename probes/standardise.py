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
        return cls._from_moments(mean.double(), var.double().sqrt(), x.dtype)

    @classmethod
    def fit_apply(
        cls, x: Float[Tensor, "layer batch d_model"], *, inplace: bool = False
    ) -> tuple[Standardiser, Float[Tensor, "layer batch d_model"]]:
        """``fit(x)`` and ``apply(x)`` in four passes over ``x`` instead of six (the centred copy is
        reused for the scale and scaled in place); the same numbers up to rounding in ``x``'s dtype.
        ``inplace=True`` standardises ``x`` itself (a float tensor the caller owns) and returns it."""
        n = x.shape[1]
        first = x.sum(1, keepdim=True).div_(n)
        centred = x.sub_(first) if inplace else x - first
        # the corrected two-pass algorithm: the centred data's own mean (rounding error of the first)
        # fixes the mean and the variance, and is subtracted in the same pass as the division
        resid = centred.sum(1, keepdim=True).div_(n)
        sq = torch.linalg.vector_norm(centred, dim=1).double().square_()
        std = sq.div_(n).sub_(resid[:, 0].double().square()).clamp_min_(0).sqrt_()
        st = cls._from_moments((first + resid)[:, 0].double(), std, x.dtype)
        inv = st.scale[:, None].reciprocal().to(x.dtype)
        return st, torch.addcmul(-resid * inv, centred, inv, out=centred)

    @classmethod
    def _from_moments(cls, mean: Tensor, std: Tensor, dtype: torch.dtype) -> Standardiser:
        # the same rule as scikit-learn's StandardScaler: a (near-)constant feature keeps scale 1
        tiny = std <= 10 * torch.finfo(dtype).eps * mean.abs().clamp_min(1.0)
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
