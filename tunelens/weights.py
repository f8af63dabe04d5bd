"""Canonical access to every linear weight matrix of a causal LM, and to its LoRA factors.

A :class:`MatrixName` (``layer``, ``kind``) names one of the linear maps of a decoder block. The functions
here read, compare and overwrite those matrices on a plain HF model of any declared family
(:mod:`tunelens.families`) or a peft-wrapped one, without any backend. A fused projection is split into its
matrices (GPT-2's ``c_attn``, GPT-NeoX's interleaved ``query_key_value`` and Phi-3's ``qkv_proj`` into q, k
and v; Phi-3's ``gate_up_proj`` into gate and up), and GPT-2's Conv1D weights are transposed, so every
family's matrices have the same names and orientation (``d_out × d_in``, the dimension vocabulary of the
project). A plain MLP (GPT-2, GPT-NeoX) has no ``gate``:

====  ==========================  ====  ==========================
kind  shape                       kind  shape
====  ==========================  ====  ==========================
q     (head·d_head) × d_model     gate  d_mlp × d_model
k, v  (kv_head·d_head) × d_model  up    d_mlp × d_model
o     d_model × (head·d_head)     down  d_model × d_mlp
====  ==========================  ====  ==========================

Under peft, the *stored* weight of a matrix is the base layer's weight ``W0``; the *effective* weight is
what the forward pass uses, ``W0 + scaling·B@A`` for each active, unmerged LoRA adapter. Parameter names
are *canonical* HF names (``model.layers.5.self_attn.q_proj.weight``) whether or not peft wraps the model.

Example:
    >>> name = MatrixName.parse("L5.q")
    >>> name, str(name), hf_param_name(name)
    (MatrixName(layer=5, kind='q'), 'L5.q', 'model.layers.5.self_attn.q_proj.weight')
    >>> matrix_name_of("base_model.model.model.layers.5.mlp.down_proj.base_layer.weight")
    MatrixName(layer=5, kind='down')
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tunelens.dims import ModelDims
from tunelens.errors import ConfigError, ModelLoadError, PairIncompatibleError, ShapeError
from tunelens.families import BY_ARCHITECTURE, family_of
from tunelens.families.base import MATRIX_KINDS, _unwrap, as_slice

MatrixKind = Literal["q", "k", "v", "o", "gate", "up", "down"]
assert get_args(MatrixKind) == MATRIX_KINDS
_BLOCK = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn"} | dict.fromkeys(
    ("gate", "up", "down"), "mlp"
)
_PARAM_RE = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.(q|k|v|o)|mlp\.(gate|up|down))_proj\.(?:base_layer\.)?weight$"
)
_PEFT_PREFIX = "base_model.model."

Matrix = Float[Tensor, "d_out d_in"]


@dataclass(frozen=True, order=True)
class MatrixName:
    """One linear matrix: ``kind`` in block ``layer``. Sorts layer-major, kinds in ``MATRIX_KINDS`` order."""

    layer: int
    _rank: int = field(init=False, repr=False)  # position of kind in MATRIX_KINDS, for ordering only
    kind: MatrixKind

    def __post_init__(self) -> None:
        if self.kind not in MATRIX_KINDS:
            raise ConfigError(f"unknown matrix kind {self.kind!r}; expected one of {', '.join(MATRIX_KINDS)}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ConfigError(f"matrix {self.kind!r} needs a layer >= 0, got {self.layer!r}")
        object.__setattr__(self, "_rank", MATRIX_KINDS.index(self.kind))

    def __str__(self) -> str:
        return f"L{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, text: str) -> MatrixName:
        """``"L5.q"`` -> ``MatrixName(5, "q")``."""
        match = re.fullmatch(r"L(\d+)\.(\w+)", text.strip())
        if match is None:
            raise ConfigError(f"cannot parse matrix name {text!r}; expected 'L<layer>.<kind>' such as 'L5.q'")
        return cls(int(match[1]), match[2])  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA factors of one matrix for one adapter: ``delta = scaling * B @ A``."""

    A: Float[Tensor, "rank d_in"]
    B: Float[Tensor, "d_out rank"]
    scaling: float
    rank: int

    def delta(self) -> Matrix:
        return self.scaling * (self.B @ self.A)


def matrix_names(model_or_dims: nn.Module | ModelDims) -> list[MatrixName]:
    """Every matrix of the model, layer-major: ``[L0.q, L0.k, ..., L0.down, L1.q, ...]``."""
    if isinstance(model_or_dims, ModelDims):
        n_layers = model_or_dims.n_layers
        family = BY_ARCHITECTURE.get(model_or_dims.architecture)
    else:
        family = family_of(model_or_dims)
        n_layers = len(family.layer_modules(model_or_dims))
    kinds = family.matrix_kinds if family is not None else MATRIX_KINDS
    return [MatrixName(layer, kind) for layer in range(n_layers) for kind in kinds]  # type: ignore[arg-type]


def hf_param_name(name: MatrixName) -> str:
    """The canonical HF parameter name, e.g. ``model.layers.5.mlp.down_proj.weight``."""
    return f"model.layers.{name.layer}.{_BLOCK[name.kind]}.{name.kind}_proj.weight"


def matrix_name_of(param_name: str) -> MatrixName | None:
    """The matrix a parameter name refers to (plain or peft-wrapped), or None for other parameters."""
    match = _PARAM_RE.search(param_name)
    return None if match is None else MatrixName(int(match[1]), match[2] or match[3])  # type: ignore[arg-type]


def canonical_param_name(param_name: str) -> str:
    """Strip peft's wrapping: ``base_model.model.X.q_proj.base_layer.weight`` -> ``X.q_proj.weight``."""
    return param_name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")


def read_matrix(model: nn.Module, name: MatrixName, *, adapter: bool = True) -> Matrix:
    """The weight of ``name`` as a detached float32 copy (``d_out × d_in``); the model is not changed.

    With ``adapter=True`` it is the effective weight the forward pass uses (active LoRA adapters added,
    none if adapters are disabled); with ``adapter=False`` it is the base weight ``W0``.
    """
    spot = _spot(model, name)
    module = spot.module
    stored = spot.oriented(_stored_weight(module).detach()).to(torch.float32, copy=True)
    if _is_lora(module):
        merged = set(module.merged_adapters)  # merged adapters are already inside the stored weight
        if not adapter or module.disable_adapters:
            for a in merged:
                stored -= _delta(module, a)
        else:
            for a in module.active_adapters:
                if a in module.lora_A and a not in merged:
                    stored += _delta(module, a)
    return spot.block(stored)


def lora_factors(
    model: nn.Module, name: MatrixName, *, adapter_name: str | None = None
) -> LoraFactors | None:
    """The LoRA factors of ``name`` for ``adapter_name`` (default: the active adapter, usually
    ``"default"``), as float32 copies; None where the matrix has no such adapter."""
    spot = _spot(model, name)
    module = spot.module
    if not _is_lora(module):
        return None
    if adapter_name is None:
        adapter_name = module.active_adapters[0] if module.active_adapters else "default"
    known = getattr(model, "peft_config", None)
    if known is not None and adapter_name not in known:
        raise ConfigError(f"unknown adapter {adapter_name!r}; the model has {', '.join(sorted(known))}")
    if adapter_name not in module.lora_A:
        return None
    factors = _factors(module, adapter_name)
    if spot.rows is None:
        return factors
    return LoraFactors(A=factors.A, B=spot.block(factors.B), scaling=factors.scaling, rank=factors.rank)


def read_all(
    model: nn.Module, names: Iterable[MatrixName] | None = None, *, adapter: bool = True
) -> dict[MatrixName, Matrix]:
    """``read_matrix`` for every name (default: all matrices of the model)."""
    names = matrix_names(model) if names is None else names
    return {n: read_matrix(model, n, adapter=adapter) for n in names}


def weight_delta(base_model: nn.Module, tuned_model: nn.Module, name: MatrixName) -> Matrix:
    """Effective ``tuned − base`` weight of ``name`` (float32)."""
    base, tuned = read_matrix(base_model, name), read_matrix(tuned_model, name)
    if base.shape != tuned.shape:
        raise PairIncompatibleError(
            f"matrix {name} has shape {tuple(base.shape)} in the base model but {tuple(tuned.shape)} "
            "in the tuned model; the two models must share their architecture sizes"
        )
    return tuned - base


def replace_matrix(model: nn.Module, name: MatrixName, value: Tensor) -> None:
    """Overwrite the stored weight of ``name`` in place (``W0`` under peft; adapters still add on top)."""
    spot = _spot(model, name)
    _check_value(str(name), spot.stored_block(), value)
    spot.write(value)


@contextmanager
def swapped_matrices(model: nn.Module, values: Mapping[MatrixName, Tensor]) -> Iterator[nn.Module]:
    """Temporarily replace stored weights; the originals come back even if the body raises.

    Example (``model``: a tiny 4-layer Llama with d_model 64; ``model.module`` is its HF model):
        >>> ids = model.encode(["The pen is in Box C. Box C contains the"]).input_ids
        >>> zeros = {MatrixName(layer, "o"): torch.zeros(64, 64) for layer in range(4)}
        >>> with torch.no_grad(), swapped_matrices(model.module, zeros) as hf:
        ...     ablated_logits = hf(ids).logits  # no layer's attention writes anything
        >>> tuple(ablated_logits.shape)
        (1, 11, 89)
        >>> bool(read_matrix(model.module, MatrixName(0, "o")).abs().sum() > 0)  # the originals are back
        True
    """
    spots = {name: _spot(model, name) for name in values}
    for name, value in values.items():
        _check_value(str(name), spots[name].stored_block(), value)
    originals = {name: spot.stored_block().detach().clone() for name, spot in spots.items()}
    try:
        for name, value in values.items():
            spots[name].write(value)
        yield model
    finally:
        for name, original in originals.items():
            spots[name].write(original)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter of ``module`` requires gradients for the duration (restored after, also after an error):
    gradients then reach only the tensors a caller passes in (activations, a mask, a graft's θ(γ))."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


_BLOCK_KEY = re.compile(r"^(.*)\[(q|k|v|gate|up)\]$")


def matrix_param_names(model: nn.Module) -> dict[MatrixName, str]:
    """Each matrix's parameter, by canonical name: the projection's weight, or for a block of a fused
    projection a *block key* ``<weight name>[<kind>]`` (``transformer.h.0.attn.c_attn.weight[q]``), which
    :func:`trainable_params` and :func:`functional_forward` understand."""
    return {name: key for name, key, _, _ in _matrix_params(model)}


def _matrix_params(model: nn.Module) -> list[tuple[MatrixName, str, str, Tensor | None]]:
    """Per matrix: its name, its key (the weight's canonical name, or a block key), the weight's canonical
    name, and the rows it occupies in a fused projection (``None``: the whole weight)."""
    family = family_of(model)
    dims = ModelDims.from_hf_config(_unwrap(model).config)
    out = []
    for name in matrix_names(model):
        path, rows = family.matrix(name.kind, dims)
        param = f"{family.layers}.{name.layer}.{path}.weight"
        out.append((name, param if rows is None else f"{param}[{name.kind}]", param, rows))
    return out


def read_stored(model: nn.Module, name: MatrixName, *, adapter: bool = True) -> Matrix:
    """:func:`read_matrix` in the orientation the parameter stores it (GPT-2's Conv1D: ``d_in × d_out``), the
    shape of its entry in :func:`trainable_params`."""
    matrix = read_matrix(model, name, adapter=adapter)
    return matrix.T if _spot(model, name).conv1d else matrix


def trainable_params(
    model: nn.Module, *, include_embeddings: bool = False, include_norms: bool = False
) -> dict[str, Tensor]:
    """Stored parameters by canonical HF name: the linear matrices (a fused projection as one entry per
    matrix, under its block key: :func:`matrix_param_names`), optionally embeddings and norms, in the order of
    ``named_parameters``.

    Values are detached views of the live parameters where they can be (a GPT-NeoX q/k/v block is a copy), so
    a graft ``{n: base[n] + gamma[n] * (tuned[n] - base[n])}`` sends gradients only to ``gamma``.
    """
    family = family_of(model)
    by_param: dict[str, list[tuple[str, Tensor | None]]] = {}
    for _, key, param, rows in _matrix_params(model):
        by_param.setdefault(param, []).append((key, rows))
    out: dict[str, Tensor] = {}
    for real, param in model.named_parameters():
        name = canonical_param_name(real)
        last = name.rsplit(".", 2)[-2]  # the module's own name, e.g. "input_layernorm"
        if name in by_param:
            for key, rows in by_param[name]:
                stored = param.detach().T if family.conv1d else param.detach()
                block = stored if rows is None else stored[as_slice(rows)]
                out[key] = block.T if family.conv1d else block
        elif (include_embeddings and last in family.embedding_modules) or (
            include_norms and "lora_" not in name and ("norm" in last or last in family.norm_modules)
        ):
            out[name] = param.detach()
    return out


def functional_forward(model: nn.Module, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """Run ``model(*args, **kwargs)`` with ``params`` (canonical or real names) in place of its own.

    Only the given names are overridden, through ``torch.func.functional_call``, so gradients flow to the
    tensors passed in. Example: ``functional_forward(model, {hf_param_name(n): w0 + m * delta}, ids)``.
    """
    real = {canonical_param_name(n): (n, p) for n, p in model.named_parameters(remove_duplicate=False)}
    real |= {n: (n, p) for n, p in model.named_parameters(remove_duplicate=False)}
    params = _assemble_blocks(model, params, real)
    overrides: dict[str, Tensor] = {}
    for name, value in params.items():
        if name not in real:
            raise PairIncompatibleError(
                f"parameter {name!r} is not in the model {type(model).__name__}; "
                f"expected a name such as {next(iter(real))!r} (see trainable_params)"
            )
        real_name, param = real[name]
        if value.shape != param.shape:
            expected, got = tuple(param.shape), tuple(value.shape)
            raise ShapeError(f"parameter {name!r}: expected shape {expected}, got {got}")
        overrides[real_name] = value
    return torch.func.functional_call(model, overrides, args, kwargs)


def _assemble_blocks(
    model: nn.Module, params: Mapping[str, Tensor], real: Mapping[str, tuple[str, Tensor]]
) -> dict[str, Tensor]:
    """Block keys (``c_attn.weight[q]``) put back into their fused parameter (the live value where a block
    is not given), differentiably: gradients reach each block's tensor."""
    blocks = {k: _BLOCK_KEY.match(k) for k in params}
    if not any(blocks.values()):
        return dict(params)
    family = family_of(model)
    dims = ModelDims.from_hf_config(_unwrap(model).config)
    out = {k: v for k, v in params.items() if blocks[k] is None}
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, match in blocks.items():
        if match is not None:
            grouped.setdefault(match[1], {})[match[2]] = params[key]
    for param, parts in grouped.items():
        if param not in real:
            raise PairIncompatibleError(
                f"parameter {param!r} (of block keys {sorted(parts)}) is not in the model"
            )
        full = out.get(param, real[param][1].detach())
        w = full.T if family.conv1d else full
        for kind, value in parts.items():
            rows = family.matrix(kind, dims)[1]
            block = value.T if family.conv1d else value
            if block.shape != (len(rows), w.shape[1]):
                want = (len(rows), w.shape[1])
                raise ShapeError(f"block {param}[{kind}]: expected shape {want}, got {tuple(block.shape)}")
            w = w.index_put((rows.to(w.device),), block.to(w.dtype))
        out[param] = w.T if family.conv1d else w
    return out


def content_hash(model: nn.Module, *, adapters: bool = True) -> str:
    """sha256 (first 16 hex chars) over every parameter's canonical name, shape, dtype and bytes, plus the
    LoRA scalings; equal weights hash equal. A peft model hashes its base weights and adapter tensors;
    with ``adapters=False`` only its base weights (the hash of the model with the adapter switched off)."""
    hasher = hashlib.sha256()
    named = {canonical_param_name(n): p for n, p in model.named_parameters() if adapters or "lora_" not in n}
    for name in sorted(named):
        tensor = named[name].detach()
        hasher.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)  # works for bfloat16 too
        hasher.update(memoryview(flat.numpy()))
    for module_name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if adapters and _is_lora(module):
            scalings = sorted(module.scaling.items())
            hasher.update(f"{module_name.removeprefix(_PEFT_PREFIX)}|{scalings}".encode())
    return hasher.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- internals


def _layers(model: nn.Module) -> nn.ModuleList:
    try:
        layers = family_of(model).layer_modules(model)
    except (ConfigError, ModelLoadError, AttributeError) as exc:
        raise ModelLoadError(
            f"cannot find decoder layers in {type(model).__name__}: {exc}; expected an HF causal LM of a "
            "declared family (tunelens/families/) or a peft model wrapping one"
        ) from None
    return layers


@dataclass(frozen=True)
class _Spot:
    """Where one matrix is stored: its module, the output features it occupies in a fused projection
    (``None``: all of them), and whether the module stores ``(in, out)`` (GPT-2's Conv1D)."""

    module: nn.Module
    rows: Tensor | None
    conv1d: bool

    def oriented(self, weight: Tensor) -> Tensor:
        """A stored weight (or a view of it) as ``d_out × d_in``."""
        return weight.T if self.conv1d else weight

    def block(self, matrix: Tensor) -> Tensor:
        """This matrix's rows of a ``d_out × d_in`` (or ``d_out × r``) tensor of the whole projection."""
        return matrix if self.rows is None else matrix[self.rows.to(matrix.device)]

    def stored_block(self) -> Tensor:
        return self.block(self.oriented(_stored_weight(self.module)))

    def write(self, value: Tensor) -> None:
        weight = self.oriented(_stored_weight(self.module))  # a view: writes reach the parameter
        with torch.no_grad():
            if self.rows is None:
                weight.copy_(value)
            else:
                weight[self.rows.to(weight.device)] = value.to(weight.dtype)


def _spot(model: nn.Module, name: MatrixName) -> _Spot:
    family = family_of(model)
    layers = _layers(model)
    if name.layer >= len(layers):
        raise ConfigError(f"matrix {name}: layer {name.layer} is out of range 0..{len(layers) - 1}")
    path, rows = family.matrix(name.kind, ModelDims.from_hf_config(_unwrap(model).config))
    return _Spot(family.module(model, name.layer, path), rows, family.conv1d)


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _stored_weight(module: nn.Module) -> nn.Parameter:
    from transformers.pytorch_utils import Conv1D

    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(base, nn.Linear | Conv1D):
        raise ModelLoadError(f"expected an nn.Linear (or GPT-2's Conv1D), found {type(base).__name__}")
    return base.weight


def _factors(module: nn.Module, adapter_name: str) -> LoraFactors:
    variant = getattr(module, "lora_variant", {}).get(adapter_name)
    if variant is not None:  # DoRA and friends change the weight beyond scaling * B @ A
        raise ConfigError(
            f"adapter {adapter_name!r} is a LoRA variant ({type(variant).__name__}); only plain LoRA works"
        )
    a = module.lora_A[adapter_name].weight.detach().to(torch.float32, copy=True)
    b = module.lora_B[adapter_name].weight.detach().to(torch.float32, copy=True)
    return LoraFactors(A=a, B=b, scaling=float(module.scaling[adapter_name]), rank=a.shape[0])


def _delta(module: nn.Module, adapter_name: str) -> Matrix:
    return _factors(module, adapter_name).delta().to(_stored_weight(module).device)


def _check_value(name: str, weight: Tensor, value: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise ShapeError(f"matrix {name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.shape != weight.shape:
        raise ShapeError(f"matrix {name}: expected shape {tuple(weight.shape)}, got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ShapeError(f"matrix {name}: the new value contains NaN or inf")
