"""Difference-of-means probes: the shared :func:`tunelens.directions.diff_of_means`, one per layer.

The probe scores ``uᵀx`` (``u`` the unit direction from the class-0 mean to the class-1 mean, in raw
activation space) and predicts class 1 above the midpoint of the two projected class means. It is the
same direction the context knob and the atlas use, so its cosine with other directions is meaningful.

Example:
    >>> import torch
    >>> x = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]]])  # [layer, batch, d]
    >>> fit, dirs = fit_diff_means(x, torch.tensor([0, 0, 1, 1]), layers=[3])
    >>> fit.weight[0, :, 0].tolist(), fit.bias[0].tolist(), str(dirs[0].site)
    ([1.0, 0.0], [-2.0], 'resid_post.3')
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.linear_fit import LinearFit
from tunelens.directions import Direction, diff_of_means
from tunelens.sites import Site


def fit_diff_means(
    x: Float[Tensor, "layer batch d_model"],
    y: Int[Tensor, " batch"],
    *,
    layers: Sequence[int],
    site_kind: str = "resid_post",
    model: str = "",
) -> tuple[LinearFit, list[Direction]]:
    """Per layer: the diff-of-means direction (raw space) as an affine probe ``x ↦ uᵀx - threshold``."""
    dirs, ws, bs = [], [], []
    for i, layer in enumerate(layers):
        xl = x[i].float()
        d = diff_of_means(xl, y, site=Site(site_kind, layer), model=model)  # type: ignore[arg-type]
        proj = d.project(xl).double()
        mid = 0.5 * (proj[y == 0].mean() + proj[y == 1].mean())
        dirs.append(d)
        ws.append(d.vector.double())
        bs.append(-mid)
    n = len(layers)
    fit = LinearFit(
        weight=torch.stack(ws)[:, :, None],
        bias=torch.stack(bs)[:, None],
        converged=torch.ones(n, dtype=torch.bool),
        n_iter=torch.zeros(n, dtype=torch.long),
    )
    return fit, dirs
