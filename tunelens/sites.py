"""Sites: the one vocabulary for hook points, and the only place hook names are built.

A :class:`Site` names *what* to read or write (``kind``), in which ``layer`` and, for per-head kinds,
which ``head``. Backends translate a site into their own hook point through :func:`bridge_hook_name`
and :func:`module_side` (from the family's declaration, :mod:`tunelens.families`); no other module builds
such names.

Activation shapes, in the dimension vocabulary ``batch pos layer head kv_head d_model d_head d_vocab``:

==============  ==========================================  =========================================
kind            meaning                                     shape (head=None / head=h)
==============  ==========================================  =========================================
resid_pre       residual stream entering block ``layer``    batch pos d_model
resid_mid       residual after attention, before the MLP    batch pos d_model
resid_post      residual leaving block ``layer``            batch pos d_model
attn_out        what attention adds to the residual         batch pos d_model
mlp_out         what the MLP adds to the residual           batch pos d_model
z               per-head output before ``o_proj``           batch pos head d_head / batch pos d_head
q               query projection (before rotary)            batch pos head d_head / batch pos d_head
k, v            key / value projection (before rotary)      batch pos kv_head d_head / batch pos d_head
pattern         attention probabilities                     batch head pos pos / batch pos pos
logits          next-token logits                           batch pos d_vocab
==============  ==========================================  =========================================

Example:
    >>> from tunelens.sites import Site
    >>> Site("z", 3, head=2)
    Site('z', 3, head=2)
    >>> str(Site.parse("resid_post.5"))
    'resid_post.5'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from tunelens.errors import SiteError
from tunelens.families.base import as_slice

if TYPE_CHECKING:
    from torch import Tensor

    from tunelens.dims import ModelDims
    from tunelens.families import Family

SiteKind = Literal[
    "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "pattern", "q", "k", "v", "logits"
]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)
RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
QUERY_HEAD_KINDS = ("z", "q", "pattern")
KV_HEAD_KINDS = ("k", "v")
HEAD_KINDS = QUERY_HEAD_KINDS + KV_HEAD_KINDS


@dataclass(frozen=True)
class Site:
    """A hook point: ``kind`` at ``layer`` (``None`` only for ``logits``), optionally one ``head``."""

    kind: SiteKind
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}; expected one of {', '.join(SITE_KINDS)}")
        if self.kind == "logits":
            if self.layer is not None or self.head is not None:
                raise SiteError(
                    f"site 'logits' takes no layer or head, got layer={self.layer} head={self.head}"
                )
            return
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise SiteError(f"site {self.kind!r} needs a layer >= 0, got {self.layer!r}")
        if self.head is not None:
            if self.kind not in HEAD_KINDS:
                raise SiteError(f"site {self.kind!r} has no heads; heads exist for {', '.join(HEAD_KINDS)}")
            if not isinstance(self.head, int) or isinstance(self.head, bool) or self.head < 0:
                raise SiteError(f"site {self.kind!r} needs a head >= 0, got {self.head!r}")

    def __repr__(self) -> str:
        args = [repr(self.kind)] + ([] if self.layer is None else [str(self.layer)])
        if self.head is not None:
            args.append(f"head={self.head}")
        return f"Site({', '.join(args)})"

    def __str__(self) -> str:
        parts = [self.kind] + [str(p) for p in (self.layer, self.head) if p is not None]
        return ".".join(parts)

    @classmethod
    def parse(cls, text: str) -> Site:
        """Parse ``kind[.layer[.head]]`` as printed by ``str(site)``."""
        parts = text.strip().split(".")
        try:
            nums = [int(p) for p in parts[1:]]
        except ValueError:
            raise SiteError(
                f"cannot parse site {text!r}; expected 'kind.layer' or 'kind.layer.head'"
            ) from None
        if len(nums) > 2:
            raise SiteError(f"cannot parse site {text!r}; expected at most a layer and a head")
        return cls(parts[0], *nums)  # type: ignore[arg-type]

    @property
    def is_head_kind(self) -> bool:
        return self.kind in HEAD_KINDS

    @property
    def head_dim_name(self) -> str:
        """``kv_head`` for k and v (grouped-query attention), ``head`` otherwise."""
        return "kv_head" if self.kind in KV_HEAD_KINDS else "head"

    def whole(self) -> Site:
        """The same site with all heads (what a backend hooks)."""
        return self if self.head is None else Site(self.kind, self.layer)

    def validate(self, dims: ModelDims) -> Site:
        """Check the layer and head against a model's sizes; return ``self``."""
        if self.layer is not None and self.layer >= dims.n_layers:
            raise SiteError(
                f"site {self}: layer {self.layer} out of range; this model has layers 0..{dims.n_layers - 1}"
            )
        if self.kind == "resid_mid" and dims.parallel_residual:
            raise SiteError(
                f"site {self}: this model has a parallel residual (attention and MLP both read "
                "resid_pre), so there is no resid_mid; use resid_pre, attn_out, mlp_out or resid_post"
            )
        if self.head is not None:
            n = dims.n_kv_heads if self.kind in KV_HEAD_KINDS else dims.n_heads
            if self.head >= n:
                raise SiteError(
                    f"site {self}: {self.head_dim_name} {self.head} out of range; "
                    f"this model has {self.head_dim_name}s 0..{n - 1} for {self.kind!r}"
                )
        return self

    def shape(self, dims: ModelDims, batch: int, pos: int) -> tuple[int, ...]:
        """The activation shape this site has for a batch of ``batch`` prompts of ``pos`` tokens."""
        if self.kind in RESIDUAL_KINDS:
            return (batch, pos, dims.d_model)
        if self.kind == "logits":
            return (batch, pos, dims.d_vocab)
        if self.kind == "pattern":
            return (batch, pos, pos) if self.head is not None else (batch, dims.n_heads, pos, pos)
        n = dims.n_kv_heads if self.kind in KV_HEAD_KINDS else dims.n_heads
        return (batch, pos, dims.d_head) if self.head is not None else (batch, pos, n, dims.d_head)


def site(dims: ModelDims, kind: str, layer: int | None = None, head: int | None = None) -> Site:
    """Build a site and validate it against a model's sizes at once (the usual way to make one)."""
    return Site(kind, layer, head).validate(dims)  # type: ignore[arg-type]


def all_layers(dims: ModelDims, kind: str) -> list[Site]:
    """``kind`` at every layer of a model."""
    return [Site(kind, layer) for layer in range(dims.n_layers)]  # type: ignore[arg-type]


# --- hook names: the backends call these, nothing else builds names ------------------------------------

_BRIDGE_NAMES = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "z": "blocks.{L}.attn.hook_z",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
    "pattern": "blocks.{L}.attn.hook_pattern",
}


def bridge_hook_name(site: Site) -> str:
    """The transformer-lens ``TransformerBridge`` hook name of a site (all heads)."""
    if site.kind == "logits":
        return "unembed.hook_out"
    return _BRIDGE_NAMES[site.kind].format(L=site.layer)


@dataclass(frozen=True)
class ModuleSide:
    """Where an HF model carries a site: a module ``path`` (under the ``*ForCausalLM``), its ``side``
    (``input``, ``output``, or ``output0``/``output1``: an element of a tuple output) and, for a q/k/v
    block of a fused projection, the output ``features`` that hold it (``None``: the whole side)."""

    path: str
    side: str
    features: slice | Tensor | None = None


def module_side(site: Site, family: Family, dims: ModelDims) -> ModuleSide:
    """The HF module side that carries ``site`` in a model of ``family`` (its declared modules).

    ``resid_mid`` has no module of its own (backends derive it as ``resid_pre + attn_out``); ``pattern`` is
    the attention module's second output (eager attention).
    """
    if site.kind == "logits":  # the model's output (after Gemma's final soft-cap), not lm_head's
        return ModuleSide("", "output")
    if site.kind == "resid_mid":
        raise SiteError("site kind 'resid_mid' has no single HF module (it is resid_pre + attn_out)")
    layer = f"{family.layers}.{site.layer}"
    if site.kind == "resid_pre":
        return ModuleSide(layer, "input")
    if site.kind == "resid_post":
        return ModuleSide(layer, "output")
    if site.kind == "z":
        return ModuleSide(f"{layer}.{family.out_proj}", "input")
    if site.kind == "pattern":
        return ModuleSide(f"{layer}.{family.attention}", "output1")
    if site.kind == "attn_out":  # the attention module returns a tuple, a norm after it a tensor
        return ModuleSide(
            f"{layer}.{family.attn_add}", "output0" if family.attn_add == family.attention else "output"
        )
    if site.kind == "mlp_out":
        return ModuleSide(f"{layer}.{family.mlp_add}", "output")
    path, rows = family.qkv_rows(dims)[site.kind]  # type: ignore[index]
    return ModuleSide(f"{layer}.{path}", "output", as_slice(rows) if family.fused_qkv else None)


EXECUTION_ORDER = (
    "resid_pre",
    "q",
    "k",
    "v",
    "z",
    "pattern",
    "attn_out",
    "resid_mid",
    "mlp_out",
    "resid_post",
)


def execution_key(site: Site) -> tuple[int, int]:
    """Sort key that orders sites as a forward pass meets them (logits last)."""
    if site.kind == "logits":
        return (10**9, 0)
    return (site.layer or 0, EXECUTION_ORDER.index(site.kind))
