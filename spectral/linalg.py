"""Linear algebra of the weight-space analyses: batched singular bases, top-k subspace iteration,
the SVD of a LoRA update from its factors, effective rank and singular-vector similarity.

Every function takes a *batch* of same-shape matrices ``[batch, d_out, d_in]`` (HF orientation, one matrix
kind stacked over layers), so the 30 ``q`` matrices of SmolLM2 go through LAPACK in one call.

* :func:`left_basis` — all left singular vectors and values, exactly, from the eigen-decomposition of the
  smaller Gram matrix (``W Wᵀ`` or ``Wᵀ W``): 2–4× cheaper on CPU than ``torch.linalg.svd`` for the
  rectangular MLP matrices.
* :func:`top_left` — only the top ``k`` left singular vectors, by block subspace iteration started from a
  caller-supplied guess (the base model's top vectors and a sketch of the update), iterated until every
  requested vector's residual is below ``tol``; it never returns an unconverged vector (it falls back to the
  exact basis instead).
* :func:`lowrank_svd` — the SVD of ``scaling · B @ A`` through QR of the thin factors, never forming the
  ``d_out × d_in`` product.

Example:
    >>> import torch
    >>> w = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    >>> u, s = left_basis(w)
    >>> bool(torch.allclose(s, torch.linalg.svdvals(w), atol=1e-4))
    True
    >>> round(float(effective_rank(torch.tensor([1.0, 1.0, 0.0]))), 6)
    2.0
"""

from __future__ import annotations

import logging

import torch
from jaxtyping import Float
from torch import Tensor

from tunelens.errors import ConfigError, ShapeError

log = logging.getLogger(__name__)

Stack = Float[Tensor, "batch d_out d_in"]


def _check_stack(w: Tensor, what: str) -> None:
    if not isinstance(w, Tensor) or w.ndim != 3:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ShapeError(f"{what}: expected a stack of matrices [batch, d_out, d_in], got {shape}")
    if not torch.isfinite(w).all():
        raise ShapeError(f"{what}: the matrices contain NaN or inf")


def left_basis(w: Stack) -> tuple[Float[Tensor, "batch d_out rank"], Float[Tensor, "batch rank"]]:
    """Thin SVD's ``U`` and ``S`` of every matrix (descending ``S``; ``rank = min(d_out, d_in)``).

    Computed from ``eigh`` of the smaller Gram matrix in the input's dtype. For a tall matrix
    ``U = W V / S``; columns whose singular value is below ``1e-6 · S_max`` are re-orthonormalised (they
    are numerically arbitrary there, as in any SVD).
    """
    _check_stack(w, "left_basis")
    d_out, d_in = w.shape[-2:]
    if d_out <= d_in:
        evals, u = torch.linalg.eigh(w @ w.mT)
        s = evals.flip(-1).clamp(min=0).sqrt()
        return u.flip(-1), s
    evals, v = torch.linalg.eigh(w.mT @ w)
    s = evals.flip(-1).clamp(min=0).sqrt()
    v = v.flip(-1)
    small = s < 1e-6 * s[..., :1].clamp(min=torch.finfo(w.dtype).tiny)
    u = (w @ v) / torch.where(small, 1.0, s).unsqueeze(-2)
    if small.any():
        u, _ = torch.linalg.qr(u)  # keeps the well-defined leading columns (up to sign), fixes the rest
    return u, s


def top_left(
    w: Stack,
    k: int,
    *,
    guess: Float[Tensor, "batch d_out n_guess"] | None = None,
    oversample: int = 10,
    tol: float = 1e-4,
    max_iter: int = 30,
    generator: torch.Generator | None = None,
) -> tuple[Float[Tensor, "batch d_out k"], Float[Tensor, "batch k"]]:
    """Top ``k`` left singular vectors and values of every matrix, by subspace iteration.

    The block starts as the orthonormalised ``guess`` (padded with Gaussian columns to ``k + oversample``)
    and is multiplied by ``W Wᵀ`` until every top-``k`` Ritz pair has relative residual
    ``‖W Wᵀ u − s² u‖ / s₁² < tol``; a matrix that does not converge in ``max_iter`` rounds is answered by
    the exact :func:`left_basis` (logged). ``tol=1e-4`` puts the vectors within about ``1e-4 / gap`` of
    LAPACK's, where ``gap`` is the relative distance to the next squared singular value.
    """
    _check_stack(w, "top_left")
    batch, d_out, d_in = w.shape
    rank = min(d_out, d_in)
    if not 1 <= k <= rank:
        raise ConfigError(f"k={k} must be between 1 and the matrices' rank bound {rank} ({d_out}×{d_in})")
    width = min(rank, k + oversample)
    if width >= rank // 2:  # the block would be most of the space: the exact basis is cheaper
        u, s = left_basis(w)
        return u[..., :k], s[..., :k]
    cols = [] if guess is None else [guess.to(w.dtype)[..., :width]]
    n_rand = width - (0 if guess is None else cols[0].shape[-1])
    if n_rand > 0:
        cols.append(torch.randn(batch, d_out, n_rand, generator=generator, dtype=w.dtype))
    q, _ = torch.linalg.qr(torch.cat(cols, dim=-1))
    gram = w @ w.mT if d_out <= d_in else None
    todo = torch.arange(batch)
    u_out = torch.empty(batch, d_out, k, dtype=w.dtype)
    s_out = torch.empty(batch, k, dtype=w.dtype)
    for _ in range(max_iter):
        wq = gram[todo] @ q if gram is not None else w[todo] @ (w[todo].mT @ q)
        # Rayleigh–Ritz on span(q): eigenpairs of qᵀ W Wᵀ q
        small = q.mT @ wq
        evals, vecs = torch.linalg.eigh((small + small.mT) / 2)
        evals, vecs = evals.flip(-1), vecs.flip(-1)
        u = q @ vecs
        wu = wq @ vecs
        resid = (wu[..., :k] - u[..., :k] * evals[:, None, :k]).norm(dim=-2)
        done = (resid / evals[:, :1].clamp(min=torch.finfo(w.dtype).tiny)).amax(-1) < tol
        u_out[todo[done]] = u[done][..., :k]
        s_out[todo[done]] = evals[done][:, :k].clamp(min=0).sqrt()
        todo, wu = todo[~done], wu[~done]
        if len(todo) == 0:
            return u_out, s_out
        q, _ = torch.linalg.qr(wu)
    log.info(
        "top_left: %d of %d matrices did not converge in %d rounds; exact SVD", len(todo), batch, max_iter
    )
    u, s = left_basis(w[todo])
    u_out[todo], s_out[todo] = u[..., :k], s[..., :k]
    return u_out, s_out


def lowrank_svd(
    b: Float[Tensor, "d_out rank"], a: Float[Tensor, "rank d_in"], scaling: float = 1.0
) -> tuple[Float[Tensor, "d_out rank"], Float[Tensor, " rank"], Float[Tensor, "d_in rank"]]:
    """Thin SVD ``(U, S, V)`` of ``scaling · B @ A`` from the factors: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``,
    SVD of the ``rank × rank`` core ``R_b R_aᵀ``. Cost ``O((d_out + d_in) rank²)``, no ``d_out × d_in``
    matrix."""
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ShapeError(
            f"lowrank_svd: expected B [d_out, r] and A [r, d_in], got {tuple(b.shape)}, {tuple(a.shape)}"
        )
    qb, rb = torch.linalg.qr(b.to(torch.float64))
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)
    uc, s, vch = torch.linalg.svd(scaling * rb @ ra.T)
    return (qb @ uc).to(b.dtype), s.to(b.dtype), (qa @ vch.T).to(b.dtype)


def singular_values64(w: Stack) -> Float[Tensor, "batch rank"]:
    """All singular values, descending, from ``eigvalsh`` of the Gram matrix formed in float64 (accurate
    down to about ``1e-8 · S_max``, which a float32 Gram would blur to ``3e-4 · S_max``)."""
    _check_stack(w, "singular_values64")
    w64 = w.to(torch.float64)
    gram = w64 @ w64.mT if w.shape[-2] <= w.shape[-1] else w64.mT @ w64
    return torch.linalg.eigvalsh(gram).flip(-1).clamp(min=0).sqrt().to(w.dtype)


def effective_rank(s: Float[Tensor, "*batch rank"]) -> Float[Tensor, "*batch"]:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = s_i / Σ s_j``.

    Equals ``r`` for ``r`` equal non-zero singular values and 1 for a rank-1 matrix; 0 for a zero matrix.
    """
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp(min=torch.finfo(s.dtype).tiny)
    h = -(p * torch.log(p.clamp(min=torch.finfo(s.dtype).tiny))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), torch.zeros_like(h))


def stable_rank(s: Float[Tensor, "*batch rank"]) -> Float[Tensor, "*batch"]:
    """``‖W‖_F² / ‖W‖_2²`` (robust to a floor of tiny singular values); 0 for a zero matrix."""
    top = s[..., 0] ** 2
    return torch.where(
        top > 0, (s**2).sum(-1) / top.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(top)
    )


def best_match(
    u_tuned: Float[Tensor, "batch d_out k"], u_base: Float[Tensor, "batch d_out rank"]
) -> tuple[Float[Tensor, "batch k"], Tensor]:
    """For each tuned vector, its largest absolute cosine with any base vector, and that vector's index."""
    if u_tuned.shape[:-1] != u_base.shape[:-1]:
        raise ShapeError(
            f"best_match: tuned vectors {tuple(u_tuned.shape)} and base vectors {tuple(u_base.shape)} must "
            "share [batch, d_out]"
        )
    sim = (u_tuned.mT @ u_base).abs()
    values, index = sim.max(dim=-1)
    return values, index
