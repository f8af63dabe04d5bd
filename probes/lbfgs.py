"""Batched L-BFGS: minimise many independent smooth objectives (one per layer) in one optimisation.

Every problem keeps its own curvature history, step size and stopping state, but all of them advance
together, so one iteration is a handful of batched matrix products instead of a Python loop of fits.
A problem that has converged stops moving; the loop ends when all have.

Example:
    >>> import torch
    >>> target = torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=torch.float64)
    >>> def fun(x):  # two quadratics, one per row
    ...     return ((x - target) ** 2).sum(-1), 2 * (x - target)
    >>> out = minimize(fun, torch.zeros(2, 2, dtype=torch.float64))
    >>> torch.allclose(out.x, target), out.converged.tolist()
    (True, [True, True])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

# fun(x) -> (value per problem, gradient); ``x`` is [problem, n_params]
Objective = Callable[[Tensor], tuple[Tensor, Tensor]]
# precondition(q) -> M⁻¹q for a fixed positive-definite M per problem (a model of its Hessian); q is
# [m, problem, n_params] (m vectors per problem at once)
Preconditioner = Callable[[Tensor], Tensor]
# line(x, d) -> (phi, finish): phi(t) is the value at x + t·d (t per problem), finish(t) value and gradient
Line = Callable[
    [Tensor, Tensor], tuple[Callable[[Tensor], Tensor], Callable[[Tensor], tuple[Tensor, Tensor]]]
]


@dataclass(frozen=True)
class MinimizeResult:
    x: Float[Tensor, "problem n_params"]
    value: Float[Tensor, " problem"]
    grad_max: Float[Tensor, " problem"]
    n_iter: Int[Tensor, " problem"]
    converged: Bool[Tensor, " problem"]


def _two_loop(
    g: Tensor,
    S: Tensor,
    Y: Tensor,
    rho: Tensor,
    valid: Tensor,
    newest: int,
    precondition: Preconditioner | None = None,
) -> Float[Tensor, "problem n_params"]:
    """``-H g`` by the L-BFGS two-loop recursion, batched, over a ring buffer whose newest slot is given.

    The initial inverse Hessian is ``γ·I``, or ``γ·M⁻¹`` with a preconditioner, where ``γ = sᵀy / yᵀH₀y``
    of the newest pair (Nocedal & Wright, eq. 7.20).

    A problem that skipped an update keeps an older pair in a newer slot; the recursion then applies its
    pairs in another order, which is still a valid (positive definite) BFGS approximation.
    """
    m = S.shape[1]
    order = [(newest - i) % m for i in range(m)]  # newest first
    q = -g.to(S.dtype)
    rho, valid = rho.to(S.dtype), valid.to(S.dtype)
    alphas = {}
    for i in order:  # dot products and in-place updates: no temporaries of the history's size
        a = rho[:, i] * torch.linalg.vecdot(S[:, i], q) * valid[:, i]
        q.addcmul_(Y[:, i], a[:, None], value=-1)
        alphas[i] = a
    sy = torch.linalg.vecdot(S[:, newest], Y[:, newest])
    if precondition is None:
        yy = torch.linalg.vecdot(Y[:, newest], Y[:, newest])
    else:  # M⁻¹q and M⁻¹y in one call (one pass over the preconditioner)
        q, my = precondition(torch.stack([q, Y[:, newest]])).to(S.dtype)
        yy = torch.linalg.vecdot(Y[:, newest], my)
    gamma = torch.where(valid[:, newest] > 0, sy / yy.clamp_min(1e-30), torch.ones_like(sy))
    r = q.mul_(gamma[:, None])
    for i in reversed(order):
        b = rho[:, i] * torch.linalg.vecdot(Y[:, i], r) * valid[:, i]
        r.addcmul_(S[:, i], (alphas[i] - b)[:, None])
    return r.to(g.dtype)


def minimize(
    fun: Objective,
    x0: Float[Tensor, "problem n_params"],
    *,
    max_iter: int = 500,
    tol: float = 1e-6,
    history: int = 10,
    c1: float = 1e-4,
    max_halvings: int = 40,
    value: Callable[[Tensor], Tensor] | None = None,
    line: Line | None = None,
    precondition: Preconditioner | None = None,
) -> MinimizeResult:
    """Minimise ``fun`` from ``x0`` for every problem (row) at once.

    A problem stops when the largest entry of its gradient is below ``tol``, when a line search makes no
    progress (it is at the optimum to machine precision), or after ``max_iter`` iterations. Steps use the
    L-BFGS direction with a backtracking (Armijo) line search started at step 1. ``value(x)`` (the
    objective without its gradient) or ``line(x, d)`` (the objective along a line, e.g. from cached
    products) make the line search cheaper; ``fun`` is called once, at ``x0``, when ``line`` is given.

    ``precondition(q)`` returns ``M⁻¹q`` for a fixed positive-definite model ``M`` of each problem's
    Hessian (e.g. an upper bound on it); the recursion then starts from ``M⁻¹`` instead of the identity,
    and the first step is the preconditioned gradient step with step length 1. On ill-conditioned
    problems this turns hundreds of iterations into tens.
    """
    if line is None:
        value_fn = value or (lambda z: fun(z)[0])

        def line(x: Tensor, d: Tensor):
            return (lambda t: value_fn(x + t[:, None] * d)), (lambda t: fun(x + t[:, None] * d))

    x = x0.clone()
    f, g = fun(x)
    n_prob, n_par = x.shape
    # the curvature pairs are kept in float32: they only shape the search direction (each step is
    # still checked for descent on the float64 objective), and they are the largest state by far
    S = torch.zeros(n_prob, history, n_par, dtype=torch.float32)
    Y = torch.zeros(n_prob, history, n_par, dtype=torch.float32)
    rho = x.new_zeros(n_prob, history)
    valid = torch.zeros(n_prob, history, dtype=torch.bool)
    n_iter = torch.zeros(n_prob, dtype=torch.long)
    ever_stalled = torch.zeros(n_prob, dtype=torch.bool)
    active = g.abs().amax(-1) > tol
    newest = history - 1
    for _ in range(max_iter):
        if not active.any():
            break
        d = _two_loop(g, S, Y, rho, valid, newest, precondition)
        gd = (g * d).sum(-1)
        bad = gd >= 0  # not a descent direction: restart from steepest descent
        if bad.any():
            d = torch.where(bad[:, None], -g, d)
            valid = valid & ~bad[:, None]
            gd = (g * d).sum(-1)
        no_hist = ~valid.any(-1)
        if precondition is None:
            t = torch.where(no_hist, 1.0 / g.norm(dim=-1).clamp_min(1.0), torch.ones_like(gd))
        else:
            t = torch.ones_like(gd)
        t = torch.where(active, t, torch.zeros_like(t))
        accepted = ~active
        phi, finish = line(x, d)
        for _ in range(max_halvings):
            f_new = phi(t)
            ok = (f_new <= f + c1 * t * gd) & torch.isfinite(f_new)
            accepted = accepted | ok
            if accepted.all():
                break
            t = torch.where(accepted, t, t * 0.5)
        stalled = active & ~accepted
        t = torch.where(accepted & active, t, torch.zeros_like(t))
        s = t[:, None] * d
        x_new = x + s
        f_new, g_new = finish(t)
        y = g_new - g
        stalled = stalled | (active & (f_new >= f))  # no decrease left at machine precision
        sy = (s * y).sum(-1)
        moved = t > 0
        upd = moved & (sy > 1e-12 * (y * y).sum(-1).clamp_min(1e-300))
        if upd.any():  # write the new pair into the ring buffer's next slot, in place
            newest = (newest + 1) % history
            S[:, newest] = torch.where(upd[:, None], s.float(), S[:, newest])
            Y[:, newest] = torch.where(upd[:, None], y.float(), Y[:, newest])
            rho[:, newest] = torch.where(upd, 1.0 / sy.clamp_min(1e-300), rho[:, newest])
            valid[:, newest] = upd | valid[:, newest]
        x = torch.where(moved[:, None], x_new, x)
        f = torch.where(moved, f_new, f)
        g = torch.where(moved[:, None], g_new, g)
        n_iter = n_iter + active.long()
        ever_stalled = ever_stalled | stalled
        active = active & ~stalled & (g.abs().amax(-1) > tol)
    grad_max = g.abs().amax(-1)
    # a problem whose line search can no longer decrease the objective is at its optimum to machine
    # precision; it counts as converged when its gradient is within 1000 x tol
    converged = (grad_max <= tol) | (ever_stalled & (grad_max <= 1e3 * tol))
    return MinimizeResult(x=x, value=f, grad_max=grad_max, n_iter=n_iter, converged=converged)
