"""Ridge-regression probes for scalar targets, every layer at once (closed form, batched).

Per layer the objective is that of ``sklearn.linear_model.Ridge(alpha)`` with an intercept:
``‖y - Xw - b‖² + alpha‖w‖²``. With the intercept unpenalised, ``b`` absorbs the means, so
``w = (XcᵀXc + alpha I)⁻¹ Xcᵀ yc`` on centred data and ``b = ȳ - x̄·w``.

Example:
    >>> import torch
    >>> x = torch.randn(2, 50, 3, dtype=torch.float64)
    >>> y = 2 * x[0, :, 0] + 1
    >>> fit = fit_ridge(x, y, alpha=1e-9)
    >>> round(float(fit.weight[0, 0, 0]), 4), round(float(fit.bias[0, 0]), 4)
    (2.0, 1.0)
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from probes.linear_fit import LinearFit


def fit_ridge(
    x: Float[Tensor, "layer batch d_model"], y: Float[Tensor, "... batch"], *, alpha: float
) -> LinearFit:
    """``y``: ``[batch]`` (the result has no ``target`` axis) or ``[layer, target, batch]``."""
    single = y.ndim == 1
    x = x.double()
    ys = (y[None, None].expand(x.shape[0], 1, -1) if single else y).double()  # [layer, target, batch]
    xm, ym = x.mean(1, keepdim=True), ys.mean(-1)  # [layer, 1, d], [layer, target]
    xc, yc = x - xm, ys - ym[..., None]
    gram = torch.bmm(xc.transpose(1, 2), xc)
    gram = gram + alpha * torch.eye(x.shape[2], dtype=x.dtype)[None]
    w = torch.linalg.solve(gram, torch.bmm(xc.transpose(1, 2), yc.transpose(1, 2)))  # [layer, d, target]
    w = w.transpose(1, 2)[..., None]  # [layer, target, d, 1]
    b = ym[..., None] - torch.einsum("ld,ltdk->ltk", xm[:, 0], w)
    n_layer, n_target = ys.shape[:2]
    conv = torch.ones(n_layer, n_target, dtype=torch.bool)
    n_iter = torch.zeros(n_layer, n_target, dtype=torch.long)
    if single:
        return LinearFit(weight=w[:, 0], bias=b[:, 0], converged=conv[:, 0], n_iter=n_iter[:, 0])
    return LinearFit(weight=w, bias=b, converged=conv, n_iter=n_iter)


def r2_score(pred: Float[Tensor, "layer batch"], y: Float[Tensor, " batch"]) -> Float[Tensor, " layer"]:
    """Coefficient of determination per layer (scikit-learn's ``r2_score``)."""
    y = y.double()
    ss_res = ((pred.double() - y[None]) ** 2).sum(-1)
    ss_tot = ((y - y.mean()) ** 2).sum().clamp_min(1e-300)
    return 1 - ss_res / ss_tot
