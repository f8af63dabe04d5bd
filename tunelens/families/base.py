"""What tunelens needs to know about an HF decoder family: where its modules live and how a fused projection
splits. Nothing else: the forward pass is always the HF model's own (:mod:`tunelens.backends.layerwise`).

A :class:`Family` is a declaration. Paths are relative to the ``*ForCausalLM`` (``layers``, ``final_norm``,
``embed``) or to one decoder layer (the rest). Measured facts behind each declaration: ten families on tiny
random-init models, verified by ``tests/unit/families/test_families.py`` against the HF modules themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tunelens.dims import ModelDims
from tunelens.errors import ConfigError

QKV = Literal["q", "k", "v"]
MATRIX_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True, kw_only=True)
class Family:
    """Where things live in one HF decoder family.

    ``qkv``: the q, k and v projections (three paths), or one fused projection (a one-element tuple) that
    splits as ``qkv_split``: ``"concat"`` = ``[Q (H·D) | K (Hkv·D) | V (Hkv·D)]``, ``"interleaved"`` = per
    head ``[q_h | k_h | v_h]`` (GPT-NeoX). ``out_proj``: the attention's output projection; its *input* is the
    per-head ``z`` (head-major, ``H·D`` wide). ``attn_add`` / ``mlp_add``: the modules whose output (first
    element when it is a tuple) is what the attention / MLP adds to the residual stream — the attention
    module itself, or a norm after it (Gemma-2/3, OLMo-2). ``conv1d``: weights stored ``(in, out)`` (GPT-2's
    Conv1D) instead of ``nn.Linear``'s ``(out, in)``.
    """

    name: str  # HF model_type
    architectures: tuple[str, ...]
    layers: str
    final_norm: str
    embed: str
    attention: str
    qkv: tuple[str, ...]
    out_proj: str
    mlp: str
    mlp_out_proj: str
    attn_add: str
    mlp_add: str
    qkv_split: Literal["concat", "interleaved"] = "concat"
    conv1d: bool = False
    attn_norm: str | None = "input_layernorm"  # the norm the attention reads through (None: none, OLMo-2)
    mlp_norm: str | None = "post_attention_layernorm"  # the norm the MLP reads through
    norm_offset: float = 0.0  # Gemma's RMSNorms scale by (offset + weight), offset 1
    positions: str | None = None  # learned position embeddings (GPT-2's wpe), if any
    gate: str | None = "mlp.gate_proj"  # None: a plain MLP (GPT-2, GPT-NeoX)
    up: str = "mlp.up_proj"  # the same path as ``gate``: one fused ``[gate | up]`` projection (Phi-3)

    def __post_init__(self) -> None:
        if len(self.qkv) not in (1, 3):
            raise ConfigError(f"family {self.name}: qkv is three projections or one fused, got {self.qkv}")

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def matrix_kinds(self) -> tuple[str, ...]:
        """The linear maps of a decoder layer, in :data:`MATRIX_KINDS` order (no ``gate`` in a plain MLP)."""
        return tuple(k for k in MATRIX_KINDS if k != "gate" or self.gate is not None)

    def matrix(self, kind: str, dims: ModelDims) -> tuple[str, Tensor | None]:
        """Where matrix ``kind`` lives: the projection (path relative to a layer) and, when it is a block of a
        fused projection, the indices of its output features (``None``: the whole projection)."""
        if kind not in self.matrix_kinds:
            raise ConfigError(
                f"family {self.name} has no {kind!r} matrix; its matrices are {', '.join(self.matrix_kinds)}"
            )
        if kind in ("q", "k", "v"):
            path, rows = self.qkv_rows(dims)[kind]  # type: ignore[index]
            return path, (rows if self.fused_qkv else None)
        if kind == "o":
            return self.out_proj, None
        if kind == "down":
            return self.mlp_out_proj, None
        if self.gate == self.up:  # fused [gate | up]
            first = 0 if kind == "gate" else dims.d_mlp
            return self.up, torch.arange(first, first + dims.d_mlp)
        return (self.gate if kind == "gate" else self.up), None  # type: ignore[return-value]

    # -- modules ---------------------------------------------------------------------------------------
    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model`` (a ``*ForCausalLM``, or a peft model wrapping one)."""
        return _get(_unwrap(model), self.layers)

    @property
    def embedding_modules(self) -> frozenset[str]:
        """Names of the modules holding embeddings: tokens, learned positions, and the LM head."""
        return frozenset(p.split(".")[-1] for p in (self.embed, self.positions, "lm_head") if p)

    @property
    def norm_modules(self) -> frozenset[str]:
        """Names of the declared norm modules: before attention and the MLP, after them (where what the
        residual receives is a norm's output), and the final norm."""
        after = [a for a, own in ((self.attn_add, self.attention), (self.mlp_add, self.mlp)) if a != own]
        paths = (self.attn_norm, self.mlp_norm, self.final_norm, *after)
        return frozenset(p.split(".")[-1] for p in paths if p)

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        """The norm after the last layer (before the unembedding)."""
        return _get(_unwrap(model), self.final_norm)

    def module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        """The module at ``path`` (relative to a decoder layer) of layer ``layer``."""
        return _get(self.layer_modules(model)[layer], path)

    def norm_gain(self, model: nn.Module, layer: int, kind: str) -> Tensor | None:
        """The diagonal gain on the residual side of matrix ``kind``: the norm the matrix reads through
        (q/k/v: ``attn_norm``; gate/up: ``mlp_norm``) or the norm after it (o: ``attn_add``; down:
        ``mlp_add``; where that is a norm); ``None`` where there is no such norm. A LayerNorm (GPT-2,
        GPT-NeoX) also centres and adds a bias; only its diagonal gain is returned."""
        if kind in ("q", "k", "v"):
            path = self.attn_norm
        elif kind in ("gate", "up"):
            path = self.mlp_norm
        elif kind == "o":
            path = None if self.attn_add == self.attention else self.attn_add
        else:
            path = None if self.mlp_add == self.mlp else self.mlp_add
        if path is None:
            return None
        weight = getattr(self.module(model, layer, path), "weight", None)
        return None if weight is None else weight.detach().float() + self.norm_offset

    # -- the q / k / v blocks of the projections ---------------------------------------------------------
    def qkv_rows(self, dims: ModelDims) -> dict[QKV, tuple[str, Tensor]]:
        """For q, k and v: the projection (path relative to a layer) and the indices of its output features
        that carry it, in head-major order (``head·d_head + i``)."""
        h, kv, d = dims.n_heads, dims.n_kv_heads, dims.d_head
        if not self.fused_qkv:
            q, k, v = self.qkv
            return {
                "q": (q, torch.arange(h * d)),
                "k": (k, torch.arange(kv * d)),
                "v": (v, torch.arange(kv * d)),
            }
        (path,) = self.qkv
        if self.qkv_split == "concat":
            return {
                "q": (path, torch.arange(h * d)),
                "k": (path, torch.arange(h * d, (h + kv) * d)),
                "v": (path, torch.arange((h + kv) * d, (h + 2 * kv) * d)),
            }
        if kv != h:
            raise ConfigError(f"family {self.name}: an interleaved qkv needs n_kv_heads == n_heads")
        base = (torch.arange(h)[:, None] * 3 * d + torch.arange(d)[None]).reshape(-1)
        return {"q": (path, base), "k": (path, base + d), "v": (path, base + 2 * d)}

    def out_features(self, module: nn.Module) -> int:
        """The output width of a projection of this family (Conv1D stores ``(in, out)``)."""
        weight = _weight(module)
        return weight.shape[1] if self.conv1d else weight.shape[0]

    def zero_outputs(self, module: nn.Module, index: Tensor) -> None:
        """Set output features ``index`` of a projection to zero, weight and bias (an edit, for tests and
        ablations; in place, without gradients)."""
        weight = _weight(module)
        with torch.no_grad():
            if self.conv1d:
                weight[:, index] = 0
            else:
                weight[index, :] = 0
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias[index] = 0


def as_slice(index: Tensor) -> slice | Tensor:
    """A contiguous run of feature indices as a slice (indexing with it is a view, no copy); anything else
    (GPT-NeoX's interleaved blocks) stays an index tensor."""
    first, n = int(index[0]), len(index)
    if torch.equal(index.cpu(), torch.arange(first, first + n)):
        return slice(first, first + n)
    return index


def take_features(t: Tensor, index: slice | Tensor) -> Tensor:
    """Features ``index`` of the last axis (a view for a slice, a copy for an index tensor)."""
    return t[..., index] if isinstance(index, slice) else t.index_select(-1, index.to(t.device))


def put_features(t: Tensor, index: slice | Tensor, value: Tensor) -> None:
    """Write ``value`` into features ``index`` of the last axis of ``t``, in place."""
    t[..., index if isinstance(index, slice) else index.to(t.device)] = value.to(t.dtype)


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` under a peft wrapper (peft keeps the module tree, with its layers wrapped)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{type(root).__name__} has no module {path!r} (stopped at {part!r})")
        obj = getattr(obj, part)
    return obj


def _weight(module: nn.Module) -> Tensor:
    base = getattr(module, "base_layer", None)  # a peft LoRA wrapper: the stored weight is its base layer's
    return (base if base is not None else module).weight
