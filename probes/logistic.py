"""Logistic-regression probes for every layer at once: one batched optimisation of scikit-learn's objective.

Per layer the objective is that of ``sklearn.linear_model.LogisticRegression(C=C)`` (lbfgs, L2):

    Σᵢ log-loss(yᵢ, xᵢW + b) + ‖W‖² / (2C)        (the intercept b is not penalised)

with the binary (sigmoid, one weight vector) loss for two classes and the full multinomial (softmax, one
weight vector per class) loss for more, as scikit-learn does. We minimise it divided by the number of
training items (same minimiser, well-scaled gradients), in float64, from zero weights: by Newton's method
for binary probes (:mod:`probes.newton`), else by L-BFGS started from the log-loss's curvature bound
(:func:`curvature_preconditioner`), which takes tens of iterations where plain L-BFGS takes hundreds.

Example:
    >>> import torch
    >>> x = torch.randn(3, 200, 5, dtype=torch.float64)   # [layer, batch, d_model]
    >>> y = (x[0, :, 0] > 0).long()
    >>> fit = fit_logistic(x, y, n_classes=2, C=1.0)
    >>> fit.weight.shape, bool(fit.converged.all())
    (torch.Size([3, 5, 1]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from probes.lbfgs import Preconditioner, minimize
from probes.linear_fit import LinearFit

NEWTON_MAX_N = 3000
"""``solver="auto"`` uses Newton for binary probes with at most this many training examples."""


class LogisticObjective:
    """Mean penalised log-loss and its gradient for ``layer × target`` independent problems.

    Parameters, losses and the optimiser state are float64; the products with the activations run in the
    dtype of ``x`` (float32 halves the memory traffic, which bounds the speed on a CPU).

    All label sets (``target``: e.g. the task, its control task and shuffled labels) of a layer share
    that layer's activations, so one matrix product serves all of them. Parameters are flattened per
    problem: row ``layer * n_target + target`` holds ``W.flatten(), b``.

    :meth:`line` evaluates the objective along a search direction from cached logits (``z + t·Xd`` is
    linear in ``t``), so an L-BFGS iteration reads the activations twice: once for ``Xd``, once for the
    gradient ``Xᵀr``.
    """

    def __init__(
        self, x: Float[Tensor, "layer batch d_model"], y: Int[Tensor, "layer target batch"], k: int, C: float
    ):
        self.x, self.n, self.d, self.k = x, x.shape[1], x.shape[2], k
        self.L, self.T = y.shape[0], y.shape[1]
        self.inv_c = 1.0 / (C * self.n)
        yt = y.transpose(1, 2)  # [layer, batch, target]
        if k == 1:
            self.target = yt.double()[..., None]
        else:
            self.target = F.one_hot(yt, k).double()
        self._z: Tensor | None = None  # logits at the point of the last gradient

    def unpack(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``[layer·target, n_params]`` -> W ``[layer, target, d_model, k]``, b ``[layer, target, k]``."""
        L, T, d, k = self.L, self.T, self.d, self.k
        return theta[:, : d * k].reshape(L, T, d, k), theta[:, d * k :].reshape(L, T, k)

    def _apply(self, w: Tensor, b: Tensor) -> Tensor:
        """Logits ``[layer, batch, target, k]``."""
        L, T, d, k = self.L, self.T, self.d, self.k
        wm = w.permute(0, 2, 1, 3).reshape(L, d, T * k).to(self.x.dtype)
        z = torch.bmm(self.x, wm).double().view(L, self.n, T, k)
        return z + b[:, None]

    def _loss(self, z: Tensor, w: Tensor) -> Tensor:
        if self.k == 1:
            data = (F.softplus(z) - self.target * z).sum((1, 3))
        else:
            data = (torch.logsumexp(z, -1) - (self.target * z).sum(-1)).sum(1)
        return (data / self.n + 0.5 * self.inv_c * (w * w).sum((2, 3))).reshape(-1)

    def _grad(self, z: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        L, T, d, k = self.L, self.T, self.d, self.k
        p = torch.sigmoid(z) if k == 1 else torch.softmax(z, -1)
        resid = (p - self.target) / self.n  # [layer, batch, target, k]
        # Xᵀr as (rᵀX)ᵀ: X is read in its stored layout, no transposed copy
        rt = resid.reshape(L, self.n, T * k).transpose(1, 2).to(self.x.dtype)
        gw = torch.bmm(rt, self.x).double().view(L, T, k, d).transpose(2, 3)
        gw = gw + self.inv_c * w
        grad = torch.cat([gw.reshape(L * T, d * k), resid.sum(1).reshape(L * T, k)], 1)
        return self._loss(z, w), grad

    def value(self, theta: Tensor) -> Float[Tensor, " problem"]:
        w, b = self.unpack(theta)
        return self._loss(self._apply(w, b), w)

    def __call__(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        w, b = self.unpack(theta)
        self._z = self._apply(w, b)
        return self._grad(self._z, w)

    def line(self, theta: Tensor, direction: Tensor):
        """``(phi, finish)`` along ``theta + t·direction`` (``theta`` must be the last point evaluated)."""
        w0, b0 = self.unpack(theta)
        z0 = self._z if self._z is not None else self._apply(w0, b0)
        dw, db = self.unpack(direction)
        dz = self._apply(dw, db)
        shape = (self.L, self.T)

        def phi(t: Tensor) -> Tensor:
            tt = t.view(shape)
            return self._loss(z0 + tt[:, None, :, None] * dz, w0 + tt[..., None, None] * dw)

        def finish(t: Tensor) -> tuple[Tensor, Tensor]:
            tt = t.view(shape)
            self._z = z0 + tt[:, None, :, None] * dz
            return self._grad(self._z, w0 + tt[..., None, None] * dw)

        return phi, finish


def curvature_preconditioner(
    x: Float[Tensor, "layer batch d_model"], n_target: int, k: int, C: float
) -> Preconditioner:
    """``M⁻¹`` for the fixed curvature bound of the mean penalised log-loss, per layer, for L-BFGS.

    The Hessian of the mean log-loss is at most ``c·XᵀX/n`` (``c`` = ¼ for the sigmoid, ½ for the
    softmax; Böhning 1992), so ``M = c·XᵀX/n + λI`` on the weights (and ``c`` on the intercepts, exact
    when the columns of ``X`` have mean zero, as standardised activations do) models the curvature of
    every class at once. It removes the ill-conditioning that comes from the activations' covariance,
    which is what makes plain L-BFGS take hundreds of iterations on residual streams; what remains
    (how far each example's ``p(1 − p)`` is below its bound) is left to the L-BFGS updates. One
    Cholesky factorisation per layer, shared by all label sets of the layer; each application is two
    triangular solves in the dtype of ``x``.
    """
    n_layer, n, d = x.shape
    c = 0.25 if k == 1 else 0.5
    m = torch.bmm(x.transpose(1, 2), x).double().mul_(c / n)
    m.diagonal(dim1=-2, dim2=-1).add_(1.0 / (C * n))
    chol, info = torch.linalg.cholesky_ex(m.to(x.dtype))
    if bool((info != 0).any()):  # float32 lost positive definiteness: factorise in float64
        chol = torch.linalg.cholesky(m).to(x.dtype)
    dk = d * k

    def apply(q: Tensor) -> Tensor:
        mq = q.shape[0]  # q [m, layer·target, d·k + k]
        w = q[..., :dk].reshape(mq, n_layer, n_target, d, k).permute(1, 3, 0, 2, 4)
        w = w.reshape(n_layer, d, mq * n_target * k).to(chol.dtype)
        w = torch.linalg.solve_triangular(chol, w, upper=False)
        w = torch.linalg.solve_triangular(chol.mT, w, upper=True)
        w = w.view(n_layer, d, mq, n_target, k).permute(2, 0, 3, 1, 4).reshape(mq, -1, dk)
        return torch.cat([w.to(q.dtype), q[..., dk:] / c], -1)

    return apply


def fit_logistic(
    x: Float[Tensor, "layer batch d_model"],
    y: Int[Tensor, "... batch"],
    *,
    n_classes: int,
    C: float,
    max_iter: int = 200,
    tol: float = 1e-4,
    solver: str = "auto",
) -> LinearFit:
    """Fit logistic probes on ``x`` (already standardised) to class ids in ``0..n_classes-1``.

    ``solver``: ``lbfgs`` (batched L-BFGS; the products with ``x`` run in its dtype, the rest in float64),
    ``newton`` (binary only, :mod:`probes.newton`, float64) or ``auto`` (Newton for binary labels with
    at most :data:`NEWTON_MAX_N` training examples, else L-BFGS). Both minimise the same objective.

    ``y`` is ``[batch]`` (one label set for every layer; the result has no ``target`` axis) or
    ``[layer, target, batch]`` (several label sets per layer, e.g. task, control and shuffled, or labels
    that differ between the layers' models), all fitted in one optimisation.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    single = y.ndim == 1
    ys = y[None, None].expand(x.shape[0], 1, -1) if single else y
    k = 1 if n_classes == 2 else n_classes
    if solver not in ("auto", "newton", "lbfgs"):
        raise ValueError(f"solver must be 'auto', 'newton' or 'lbfgs', got {solver!r}")
    if solver == "newton" and k != 1:
        raise ValueError(f"the Newton solver is binary only; got {n_classes} classes (use 'lbfgs')")
    if solver == "newton" or (solver == "auto" and k == 1 and x.shape[1] <= NEWTON_MAX_N):
        from probes.newton import fit_logistic_newton

        fit = fit_logistic_newton(x, ys, C=C, max_iter=max_iter, tol=tol)
        if single:
            return LinearFit(fit.weight[:, 0], fit.bias[:, 0], fit.converged[:, 0], fit.n_iter[:, 0])
        return fit
    basis = None
    if x.shape[1] < x.shape[2]:
        # fewer examples than dimensions: the optimum lies in the span of the examples, so fit on their
        # coordinates in an orthonormal basis Q of that span (X = RᵀQᵀ, W = QB, ‖W‖ = ‖B‖). L-BFGS from
        # zero takes the same steps (all gradients lie in the span), on fewer parameters and data.
        basis, r = torch.linalg.qr(x.double().transpose(1, 2))  # Q [layer, d, n], R [layer, n, n]
        x = r.transpose(1, 2).to(x.dtype)
    obj = LogisticObjective(x, ys, k, C)
    theta0 = torch.zeros(obj.L * obj.T, x.shape[2] * k + k, dtype=torch.float64)
    pre = curvature_preconditioner(x, obj.T, k, C)
    out = minimize(obj, theta0, max_iter=max_iter, tol=tol, line=obj.line, precondition=pre)
    w, b = obj.unpack(out.x)
    if basis is not None:
        w = torch.einsum("ldn,ltnk->ltdk", basis, w)
    conv, n_iter = out.converged.view(obj.L, obj.T), out.n_iter.view(obj.L, obj.T)
    if single:
        return LinearFit(weight=w[:, 0], bias=b[:, 0], converged=conv[:, 0], n_iter=n_iter[:, 0])
    return LinearFit(weight=w, bias=b, converged=conv, n_iter=n_iter)


def predict_proba(
    x: Float[Tensor, "layer batch d_model"], w: Float[Tensor, "layer d_model k"], b: Float[Tensor, "layer k"]
) -> Float[Tensor, "layer batch n_class"]:
    """Class probabilities of affine probes (``k`` = 1: binary, columns ``[P(0), P(1)]``)."""
    z = torch.baddbmm(b[:, None, :], x.to(w.dtype), w)
    if w.shape[-1] == 1:
        p1 = torch.sigmoid(z)
        return torch.cat([1 - p1, p1], -1)
    return torch.softmax(z, -1)
