"""Helpers both backends use to turn reads and writes into per-hook callbacks (no library imports here)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from tunelens.backends.base import Write, apply_writes, check_finite, select_head
from tunelens.dims import ModelDims
from tunelens.errors import ShapeError
from tunelens.sites import Site, execution_key


def plan(dims: ModelDims, reads: Sequence[Site], writes: Sequence[Write]) -> list[Site]:
    """Validate reads and writes against ``dims``; return the whole sites to hook, in execution order.

    ``resid_mid`` is never hooked itself: it is ``resid_pre + attn_out``, read and written at the
    ``attn_out`` hook (see :func:`attn_out_step`), so both of those are hooked for it.
    """
    for s in reads:
        s.validate(dims)
    for w in writes:
        w.site.validate(dims)
        if w.site.kind == "logits":
            raise ShapeError("writing logits is not supported; write a residual site instead")
        for name in ("value", "coords", "basis"):
            t = getattr(w, name)
            if t is not None:
                check_finite(t, f"{name} of the {w.op} write at site {w.site}")
    wholes = {s.whole() for s in reads} | {w.site.whole() for w in writes}
    for s in list(wholes):
        if s.kind == "resid_mid":
            wholes |= {Site("resid_pre", s.layer), Site("attn_out", s.layer)}
    return sorted((s for s in wholes if s.kind != "resid_mid"), key=execution_key)


def record(acts: dict[Site, Tensor], reads: Sequence[Site], whole: Site, value: Tensor) -> None:
    """Store the reads that ``whole`` serves."""
    for s in reads:
        if s.whole() == whole:
            acts[s] = select_head(value, s)


def attn_out_step(
    attn_out: Tensor,
    resid_pre: Tensor | None,
    layer: int,
    reads: Sequence[Site],
    writes: Sequence[Write],
    acts: dict[Site, Tensor],
    grad: bool,
) -> Tensor:
    """At the ``attn_out`` hook: apply its writes, then read and write ``resid_mid = resid_pre + attn_out``.

    A ``resid_mid`` write (or a read that must carry gradients) is passed on as ``attn_out = mid −
    resid_pre``, so everything downstream of the residual depends on the very tensor that was read.
    """
    attn_out = apply_writes(attn_out, Site("attn_out", layer), writes)
    record(acts, reads, Site("attn_out", layer), attn_out)
    mid_site = Site("resid_mid", layer)
    mid_writes = any(w.site.whole() == mid_site for w in writes)
    mid_reads = any(r.whole() == mid_site for r in reads)
    if not (mid_writes or mid_reads):
        return attn_out
    mid = apply_writes(resid_pre + attn_out, mid_site, writes)
    record(acts, reads, mid_site, mid)
    return mid - resid_pre if (mid_writes or grad) else attn_out
