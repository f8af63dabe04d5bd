"""The backend Protocol, and the write semantics every backend shares.

A backend runs a batch of token ids through one model and can, at any :class:`~tunelens.sites.Site`,
read the activation, write it (replace, add, project onto a subspace, or an arbitrary edit) and keep
gradients. Backends only translate between their native hook points and the *canonical* activation
shape of a site (see :mod:`tunelens.sites`); what a write does is defined once, here, in
:func:`apply_writes`, so both backends agree by construction.

Positions: ``None`` means every position; an ``int`` one position for every prompt; a ``LongTensor`` of
shape ``(batch,)`` one position per prompt (e.g. each prompt's last token under right padding), or
``(batch, k)`` several per prompt. For ``pattern`` the position selects the *query* position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tunelens.dims import ModelDims
from tunelens.errors import ShapeError
from tunelens.sites import Site

Positions = int | Tensor | None
WriteOp = Literal["replace", "add", "project", "edit"]


@dataclass(frozen=True, kw_only=True)
class TokenBatch:
    """Right-padded token ids of a batch of prompts."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.attention_mask.sum(dim=1)

    @property
    def last(self) -> Int[Tensor, " batch"]:
        """Index of each prompt's last real token."""
        return self.lengths - 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device))

    def select(self, index: slice | Tensor) -> TokenBatch:
        return TokenBatch(input_ids=self.input_ids[index], attention_mask=self.attention_mask[index])


@dataclass(frozen=True, kw_only=True)
class Write:
    """One intervention at one site; build it with :func:`replace`, :func:`add`, :func:`project` or
    :func:`edit`.

    ``fn`` is excluded from equality: two edits are equal if they aim at the same place.
    """

    site: Site
    op: WriteOp
    positions: Positions = None
    value: Tensor | None = None
    basis: Tensor | None = None
    coords: Tensor | None = None
    fn: Callable[[Tensor], Tensor] | None = field(default=None, compare=False)


def replace(site: Site, value: Tensor, positions: Positions = None) -> Write:
    """Set the activation (at ``positions``) to ``value`` (broadcast against the selection)."""
    return Write(site=site, op="replace", value=value, positions=positions)


def add(site: Site, value: Tensor, positions: Positions = None) -> Write:
    """Add ``value`` to the activation (at ``positions``), e.g. a steering vector."""
    return Write(site=site, op="add", value=value, positions=positions)


def project(
    site: Site,
    basis: Float[Tensor, "d r"],
    *,
    source: Tensor | None = None,
    coords: Tensor | None = None,
    positions: Positions = None,
) -> Write:
    """Replace the component of the activation in ``span(basis)``.

    With ``source``: interchange, ``h ← h − P h + P source`` (DAS-style patching of a subspace).
    With ``coords`` (shape ``(..., r)``): set the coordinates, ``h ← h + B (c − Bᵀh)`` (steering).
    With neither: ablate the subspace, ``h ← h − P h``. ``basis`` must have orthonormal columns.
    """
    if source is not None and coords is not None:
        raise ShapeError("project() takes either source= or coords=, not both")
    return Write(site=site, op="project", basis=basis, value=source, coords=coords, positions=positions)


def edit(site: Site, fn: Callable[[Tensor], Tensor], positions: Positions = None) -> Write:
    """Apply ``fn`` to the (selected) activation; ``fn`` must return a tensor of the same shape."""
    return Write(site=site, op="edit", fn=fn, positions=positions)


@dataclass(frozen=True, kw_only=True)
class RunOutput:
    """What a run returns: logits (unless not asked for) and the activations that were read."""

    logits: Float[Tensor, "batch pos d_vocab"] | None
    acts: dict[Site, Tensor]


@runtime_checkable
class Backend(Protocol):
    """What every backend provides. ``run`` is the only way analyses touch a model's activations."""

    name: str
    dims: ModelDims

    @property
    def device(self) -> torch.device: ...

    def run(
        self,
        batch: TokenBatch,
        *,
        reads: Sequence[Site] = (),
        writes: Sequence[Write] = (),
        grad: bool = False,
        logits: bool = True,
    ) -> RunOutput: ...

    def attached_hooks(self) -> int:
        """How many hooks/interventions are attached right now (0 outside a run)."""
        ...


# --- shared semantics --------------------------------------------------------------------------------


def select_head(act: Tensor, site: Site) -> Tensor:
    """The view of a whole-site activation that a site with ``head`` names."""
    if site.head is None:
        return act
    if site.kind == "pattern":
        return act[:, site.head]
    return act[:, :, site.head]


def _index(act: Tensor, site: Site, positions: Positions) -> tuple:
    """Advanced index selecting ``positions`` along the position axis of a (head-selected) activation."""
    pos_axis = 2 if (site.kind == "pattern" and site.head is None) else 1
    n_pos = act.shape[pos_axis]
    if isinstance(positions, int):
        if not -n_pos <= positions < n_pos:
            raise ShapeError(f"position {positions} outside the prompt (0..{n_pos - 1}) at site {site}")
        idx = [slice(None)] * act.ndim
        idx[pos_axis] = positions
        return tuple(idx)
    pos = positions.to(act.device).long()
    if pos.shape[0] != act.shape[0] or pos.ndim > 2:
        raise ShapeError(
            f"positions at site {site}: expected shape (batch,) or (batch, k) with batch={act.shape[0]}, "
            f"got {tuple(pos.shape)}"
        )
    if pos.numel() and (pos.min() < 0 or pos.max() >= n_pos):
        raise ShapeError(
            f"positions at site {site} must lie in 0..{n_pos - 1}, got {pos.min().item()}..{pos.max().item()}"
        )
    rows = torch.arange(act.shape[0], device=act.device)
    if pos.ndim == 2:
        rows = rows[:, None]
    if pos_axis == 1:
        return (rows, pos)
    return (rows, slice(None), pos) if pos.ndim == 1 else (rows[..., None], slice(None), pos[:, None, :])


def at_positions(act: Tensor, site: Site, positions: Positions = None) -> Tensor:
    """``positions`` of a (head-selected) activation of ``site``; for ``pattern`` the query position."""
    return act if positions is None else act[_index(act, site, positions)]


def _new_value(old: Tensor, w: Write) -> Tensor:
    if w.op == "replace":
        return _broadcast(w.value, old, w).to(old.dtype).expand_as(old)
    if w.op == "add":
        return old + _broadcast(w.value, old, w).to(old.dtype)
    if w.op == "edit":
        new = w.fn(old)
        if not isinstance(new, Tensor) or new.shape != old.shape:
            got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise ShapeError(f"edit at site {w.site} must return shape {tuple(old.shape)}, got {got}")
        return new
    basis = w.basis.to(old.device, old.dtype)
    if basis.ndim != 2 or basis.shape[0] != old.shape[-1]:
        raise ShapeError(
            f"project at site {w.site}: basis must have shape ({old.shape[-1]}, r), got {tuple(basis.shape)}"
        )
    current = old @ basis
    if w.coords is not None:
        target = _broadcast(w.coords, current, w).to(old.dtype)
    elif w.value is not None:
        target = _broadcast(w.value, old, w).to(old.dtype) @ basis
    else:
        target = torch.zeros_like(current)
    return old + (target - current) @ basis.T


def _broadcast(value: Tensor | None, like: Tensor, w: Write) -> Tensor:
    if value is None:
        raise ShapeError(f"{w.op} at site {w.site} needs a value")
    value = value.to(like.device)
    try:
        torch.broadcast_shapes(value.shape, like.shape)
    except RuntimeError:
        raise ShapeError(
            f"{w.op} at site {w.site}: value of shape {tuple(value.shape)} does not fit the selected "
            f"activation of shape {tuple(like.shape)}"
        ) from None
    return value


def apply_writes(act: Tensor, site: Site, writes: Sequence[Write]) -> Tensor:
    """Apply, in order, every write aimed at the whole-site ``site`` to ``act``.

    Always out of place, so gradients flow to ``act`` and to any write value that requires them.
    """
    out = act
    for w in writes:
        if w.site.whole() != site:
            continue
        view = select_head(out, w.site)
        if w.positions is None:
            new_view = _new_value(view, w)
        else:
            idx = _index(view, w.site, w.positions)
            new_view = view.clone()
            new_view[idx] = _new_value(view[idx], w)
        out = _with_head(out, w.site, new_view)
    return out


def _with_head(out: Tensor, site: Site, head_value: Tensor) -> Tensor:
    """``out`` with the head that ``site`` names (or all of it) replaced by ``head_value``."""
    if site.head is None:
        return head_value
    result = out.clone()
    if site.kind == "pattern":
        result[:, site.head] = head_value
    else:
        result[:, :, site.head] = head_value
    return result


def check_finite(t: Tensor, what: str) -> None:
    """Raise :class:`ShapeError` if ``t`` has NaN or Inf."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ShapeError(f"{what} contains {bad} non-finite values (NaN or Inf); expected finite numbers")
