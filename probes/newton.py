"""Binary logistic probes by Newton's method in the span of the training examples (few, cheap iterations).

The L2-penalised optimum lies in the row space of the training activations: ``w = Xᵀα``. With the Gram
matrix ``K = XXᵀ`` (``n × n``, computed once per layer and shared by all label sets of that layer) the
logits are ``Kα + b`` and the Newton step of the *primal* problem (scikit-learn's objective, intercept
unpenalised) restricted to that span is the solution of

    (K/n + λD⁻¹) Δα + 1·Δb/n = −D⁻¹(r/n + λα),    1ᵀ(α + Δα) = 0,

with ``r = p − y``, ``D = diag(p(1 − p))``, ``λ = 1/(C·n)``: one Cholesky factorisation of an ``n × n``
matrix per problem and iteration. Newton needs ~10 iterations whatever the conditioning of the
activations, where L-BFGS needs hundreds on real residual streams; the iterations are dense matrix
products and factorisations, which a CPU runs near its peak. It suits ``n`` up to a few thousand.

Example:
    >>> import torch
    >>> x = torch.randn(2, 300, 40, dtype=torch.float64)
    >>> y = (x[:, :, 0] + 0.5 * torch.randn(2, 300, dtype=torch.float64) > 0).long()[:, None]
    >>> fit = fit_logistic_newton(x, y, C=1.0)
    >>> fit.weight.shape, bool(fit.converged.all())
    (torch.Size([2, 1, 40, 1]), True)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from probes.linear_fit import LinearFit
from tunelens.threads import one_thread


def _objective(z: Tensor, y: Tensor, alpha: Tensor, b: Tensor, lam: float) -> Tensor:
    """Mean log-loss + (λ/2)‖w‖², with ‖w‖² = αᵀKα = αᵀ(z − b)."""
    data = (F.softplus(z) - y * z).mean(-1)
    return data + 0.5 * lam * (alpha * (z - b[..., None])).sum(-1)


def fit_logistic_newton(
    x: Float[Tensor, "layer batch d_model"],
    y: Int[Tensor, "layer target batch"],
    *,
    C: float,
    max_iter: int = 100,
    tol: float = 1e-4,
    max_elements: int = 30_000_000,
) -> LinearFit:
    """Binary logistic probes (labels 0/1) for every layer and label set; weights ``[layer, target, d, 1]``.

    Stops a problem when the largest entry of the primal gradient (of the mean objective) is below
    ``tol`` — scikit-learn's criterion. Layers are taken in chunks of at most ``max_elements`` matrix
    entries (``layer × target × batch²``) to bound memory.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    kw = dict(C=C, max_iter=max_iter, tol=tol, max_elements=max_elements)
    fit = _by_layer_chunks(x, y, **kw)
    if x.dtype == torch.float64 or bool(fit.converged.all()):
        return fit
    # float32 factorisations of an ill-conditioned system (weak regularisation, more examples than
    # dimensions) can fail or stall the iteration: the layers with such a problem are solved in float64
    layers = (~fit.converged).any(-1).nonzero()[:, 0]
    redo = _by_layer_chunks(x[layers].double(), y[layers], **kw)
    for f in ("weight", "bias", "converged", "n_iter"):
        getattr(fit, f)[layers] = getattr(redo, f)
    return fit


_THREADS = threading.Lock()


def _by_layer_chunks(x: Tensor, y: Tensor, *, max_elements: int, **kw) -> LinearFit:
    """:func:`_newton` on chunks of layers, each of at most ``max_elements`` matrix entries in flight.

    With ``torch.get_num_threads()`` = T > 1 the chunks are solved by T Python threads, each with one
    torch thread, instead of one after the other with T torch threads. The problems are small (a few
    hundred examples), so torch's own threading of each batched operation leaves much of the work —
    copies, the triangle masking after each factorisation, elementwise updates — on one core; whole
    layers per thread keep both cores busy (1.2–1.3× on the P(IK) benchmark). Torch's thread count is
    process-wide: it is 1 while the threads run and restored afterwards.
    """
    n_layer = x.shape[0]
    step = max(1, max_elements // (y.shape[1] * x.shape[1] ** 2))
    threads = min(torch.get_num_threads(), n_layer)
    if threads > 1:
        # three chunks per thread balance layers that need different numbers of iterations
        step = max(1, min(step // threads, -(-n_layer // (3 * threads))))
    chunks = [(i, min(i + step, n_layer)) for i in range(0, n_layer, step)]
    run = lambda c: _newton(x[c[0] : c[1]], y[c[0] : c[1]], **kw)
    if threads > 1 and len(chunks) > 1:
        with _THREADS, ThreadPoolExecutor(threads) as pool, one_thread():
            parts = list(pool.map(run, chunks))
    else:
        parts = [run(c) for c in chunks]
    if len(parts) == 1:
        return parts[0]
    fields = ("weight", "bias", "converged", "n_iter")
    return LinearFit(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


def _newton(x: Tensor, y: Tensor, *, C: float, max_iter: int, tol: float) -> LinearFit:
    """The Newton iteration of :func:`fit_logistic_newton` on one chunk of layers, in the dtype of ``x``."""
    n_layer, n, _ = x.shape
    n_target = y.shape[1]
    lam = 1.0 / (C * n)
    yf = y.double()  # [layer, target, batch]
    # the matrix products and factorisations run in the dtype of x (float32 halves their cost); the
    # iterates, the objective and the stopping gradient stay float64, so a float32 Newton direction only
    # makes the (checked, backtracked) steps slightly inexact, never the optimum less accurate
    gram_n = torch.bmm(x, x.transpose(1, 2)).div_(n)  # K/n [layer, batch, batch]
    # the factorisations reuse one buffer: a fresh n × n batch per iteration costs more in page faults
    # than the factorisation itself on CPU (P is symmetric, so its row-major copy is also column-major,
    # LAPACK's layout, and is factorised in place)
    work = torch.empty(n_layer * n_target, n, n, dtype=x.dtype)
    info = torch.empty(n_layer * n_target, dtype=torch.int32)
    ones = torch.ones(n, dtype=torch.float64)
    alpha = torch.zeros(n_layer, n_target, n, dtype=torch.float64)
    b = torch.zeros(n_layer, n_target, dtype=torch.float64)
    z = torch.zeros_like(alpha)
    active = torch.ones(n_layer, n_target, dtype=torch.bool)
    n_iter = torch.zeros(n_layer, n_target, dtype=torch.long)
    grad_max = torch.full((n_layer, n_target), float("inf"), dtype=torch.float64)
    for _ in range(max_iter + 1):
        p = torch.sigmoid(z)
        r = p - yf
        gvec = r / n + lam * alpha  # primal gradient: g_w = Xᵀ gvec, g_b = mean(r)
        g_w = torch.bmm(gvec.to(x.dtype), x)  # [layer, target, d]
        grad_max = torch.maximum(g_w.abs().amax(-1).double(), r.mean(-1).abs())
        active = active & (grad_max > tol)
        if not active.any() or int(n_iter.max()) >= max_iter:
            break
        dvec = (p * (1 - p)).clamp_min(1e-10)
        h = -gvec / dvec
        # P = K/n + λD⁻¹, factorised for the problems still moving only
        li, ti = active.nonzero(as_tuple=True)
        P = torch.index_select(gram_n, 0, li, out=work[: len(li)])
        P.diagonal(dim1=-2, dim2=-1).add_((lam / dvec[li, ti]).to(x.dtype))
        # a factorisation that fails stops its problem (redone in float64 by the caller)
        chol, fail = torch.linalg.cholesky_ex(P.mT, out=(P.mT, info[: len(li)]))
        rhs = torch.stack([h[li, ti], ones.expand(len(li), n)], -1).to(chol.dtype)  # [problem, batch, 2]
        sol = torch.linalg.solve_triangular(chol, rhs, upper=False)
        sol = torch.linalg.solve_triangular(chol.mT, sol, upper=True).double()
        u, v = sol[..., 0], sol[..., 1]
        db_a = n * (u.sum(-1) + alpha[li, ti].sum(-1)) / v.sum(-1)
        ok_a = fail == 0
        da_a = torch.where(ok_a[:, None], u - v * db_a[:, None] / n, torch.zeros_like(u))
        da = torch.zeros_like(alpha).index_put_((li, ti), da_a)
        db = torch.zeros_like(b).index_put_((li, ti), torch.where(ok_a, db_a, torch.zeros_like(db_a)))
        ok = torch.zeros_like(active).index_put_((li, ti), ok_a)
        dz = torch.bmm(da.to(x.dtype), gram_n).double().mul_(n) + db[..., None]  # (KΔα)ᵀ = Δαᵀ K
        # Armijo backtracking along the Newton direction (the step is 1 near the optimum)
        f0 = _objective(z, yf, alpha, b, lam)
        slope = (gvec * (dz - db[..., None])).sum(-1) + r.mean(-1) * db
        t = torch.ones_like(f0)
        for _ in range(30):
            f1 = _objective(z + t[..., None] * dz, yf, alpha + t[..., None] * da, b + t * db, lam)
            good = (f1 <= f0 + 1e-4 * t * slope) | ~ok
            if good.all():
                break
            t = torch.where(good, t, t / 2)
        t = torch.where(ok, t, torch.zeros_like(t))
        alpha, b, z = alpha + t[..., None] * da, b + t * db, z + t[..., None] * dz
        n_iter = n_iter + ok.long()
        stuck = ok & (t < 1e-8)
        active = active & ~stuck & ok
    # w = Xᵀα without a float64 copy of X: α split into its float32 part and the rest, two products
    hi = alpha.to(x.dtype)
    w = torch.bmm(hi, x).double() + torch.bmm((alpha - hi.double()).to(x.dtype), x).double()
    return LinearFit(weight=w[..., None], bias=b[..., None], converged=grad_max <= tol, n_iter=n_iter)
