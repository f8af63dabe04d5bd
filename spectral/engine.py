"""One pass over the weight matrices of a base model and its fine-tunes, one matrix kind at a time.

For every kind (``q``, ``k``, …, ``down``) the matrices of all selected layers are stacked
``[layer, d_out, d_in]``, so each decomposition is one batched LAPACK call. The pass computes what the
spectra and intruder analyses need, and nothing twice:

* the base's exact singular basis (shared by every variant of a family);
* per variant: the update ``ΔW = W_tuned − W_base`` and its singular values (from the LoRA factors when
  the variant is a peft view, otherwise from the dense difference), and the top ``k_max`` left singular
  vectors of ``W_tuned`` (subspace iteration started from the base's top vectors and a sketch of ``ΔW``);
* per baseline: a synthetic update built from a variant's ``ΔW`` (its spectrum on random singular vectors,
  or all its norm on one random rank-1 direction), analysed exactly like a real variant.

Weights are read through :mod:`tunelens.weights` on the plain HF / peft module, never through a backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from spectral import linalg
from tunelens.errors import ConfigError, PairIncompatibleError
from tunelens.models.loaded import LoadedModel
from tunelens.weights import MATRIX_KINDS, LoraFactors, MatrixName, lora_factors, read_matrix

log = logging.getLogger(__name__)

Baseline = Literal["rotated", "rank1"]
BASELINES: tuple[str, ...] = ("rotated", "rank1")


@dataclass
class PassOutput:
    """Everything one pass computed, by matrix (rows follow ``names``)."""

    names: list[MatrixName]
    variants: list[str]
    base_sigma: Tensor  # [matrix, r_max] zero-padded
    delta_sigma: dict[str, Tensor] = field(default_factory=dict)  # variant -> [matrix, r_max]
    max_sim: dict[str, Tensor] = field(default_factory=dict)  # variant -> [matrix, k_max]
    best_index: dict[str, Tensor] = field(default_factory=dict)
    top_sigma: dict[str, Tensor] = field(default_factory=dict)
    vectors: dict[str, dict[MatrixName, Tensor]] = field(
        default_factory=dict
    )  # variant -> name -> [d_out, k]
    seconds: dict[str, float] = field(default_factory=dict)


def select_names(
    n_layers: int,
    kinds: Sequence[str] = MATRIX_KINDS,
    layers: Sequence[int] | None = None,
    *,
    available: Sequence[str] = MATRIX_KINDS,
) -> list[MatrixName]:
    """Matrix names for the chosen kinds and layers (all layers by default), kind-major per layer. Kinds the
    model does not have (``available``: a plain MLP has no ``gate``) are left out; none left is an error."""
    for kind in kinds:
        if kind not in MATRIX_KINDS:
            raise ConfigError(f"unknown matrix kind {kind!r}; expected some of {', '.join(MATRIX_KINDS)}")
    kinds = [k for k in kinds if k in available]
    if not kinds:
        raise ConfigError(f"none of the chosen matrix kinds is in this model; it has {', '.join(available)}")
    chosen = range(n_layers) if layers is None else layers
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise ConfigError(f"layer {layer} is out of range 0..{n_layers - 1}")
    return [MatrixName(layer, kind) for layer in chosen for kind in MATRIX_KINDS if kind in kinds]  # type: ignore[arg-type]


def read_stack(model: LoadedModel, names: Sequence[MatrixName]) -> Tensor:
    """The effective weights of ``names`` (one kind) stacked ``[layer, d_out, d_in]``, float32."""
    with model.active() as module:
        return torch.stack([read_matrix(module, n) for n in names])


def lora_of(model: LoadedModel, name: MatrixName) -> LoraFactors | None:
    """The LoRA factors behind ``name`` if ``model`` is the adapter-on view of a peft model."""
    if model.adapter is not True:
        return None
    return lora_factors(model.module, name)


def _check_shapes(base: Tensor, tuned: Tensor, names: Sequence[MatrixName], variant: str) -> None:
    if base.shape != tuned.shape:
        raise PairIncompatibleError(
            f"matrix {names[0]} has shape {tuple(base.shape[1:])} in the base model but "
            f"{tuple(tuned.shape[1:])} in {variant!r}; the models must share their architecture sizes"
        )


def _pad(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _delta_sigma(
    model: LoadedModel, names: Sequence[MatrixName], delta: Tensor
) -> tuple[Tensor, list[Tensor | None]]:
    """Singular values of each ΔW ``[layer, rank]`` and, where LoRA factors exist, ΔW's left vectors."""
    factors = [lora_of(model, n) for n in names]
    if all(f is not None for f in factors):  # from the factors: never decompose the dense d_out × d_in update
        rank = min(delta.shape[-2:])
        out, lefts = [], []
        for f in factors:
            u, s, _ = linalg.lowrank_svd(f.B, f.A, f.scaling)
            out.append(_pad(s, rank))
            lefts.append(u)
        return torch.stack(out), lefts
    return linalg.singular_values64(delta), [None] * len(names)


def _synthetic(kind: Baseline, delta_sigma: Tensor, shape: torch.Size, gen: torch.Generator) -> Tensor:
    """Random updates: ``rotated`` has ΔW's singular values on random orthonormal vectors, ``rank1`` puts
    ΔW's whole Frobenius norm on one random rank-1 direction."""
    n, d_out, d_in = shape
    if kind == "rank1":
        x = torch.nn.functional.normalize(torch.randn(n, d_out, 1, generator=gen), dim=1)
        y = torch.nn.functional.normalize(torch.randn(n, d_in, 1, generator=gen), dim=1)
        return delta_sigma.norm(dim=-1)[:, None, None] * x @ y.mT
    rho = int((delta_sigma > 1e-6 * delta_sigma[:, :1].clamp(min=1e-30)).sum(-1).max().clamp(min=1))
    q1, _ = torch.linalg.qr(torch.randn(n, d_out, rho, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(n, d_in, rho, generator=gen))
    return (q1 * delta_sigma[:, None, :rho]) @ q2.mT


def run_pass(
    base: LoadedModel,
    variants: Mapping[str, LoadedModel],
    names: Sequence[MatrixName],
    *,
    k_max: int = 0,
    spectrum: bool = True,
    baselines: Sequence[Baseline] = (),
    keep_vectors: bool = False,
    scales: Mapping[str, float] | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> PassOutput:
    """The shared engine of :func:`spectral.spectra` and :func:`spectral.intruders` (see the module doc).

    ``scales`` multiplies a variant's update (``W0 + scale·ΔW``) before the analysis; 1 by default.
    """
    if not variants:
        raise ConfigError("expected at least one tuned variant, got none")
    for b in baselines:
        if b not in BASELINES:
            raise ConfigError(f"unknown baseline {b!r}; expected one of {', '.join(BASELINES)}")
    if baselines and not spectrum:
        raise ConfigError("baselines are built from the update's spectrum; set spectrum=True")
    by_kind: dict[str, list[MatrixName]] = {}
    for n in names:
        by_kind.setdefault(n.kind, []).append(n)
    out_names = [n for kind in by_kind for n in by_kind[kind]]
    all_variants = list(variants) + [f"{b}:{v}" for b in baselines for v in variants]
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, dict[str, list[Tensor]]] = {}
    base_rows: list[Tensor] = []
    vectors: dict[str, dict[MatrixName, Tensor]] = {v: {} for v in all_variants} if keep_vectors else {}
    seconds: dict[str, float] = {"base": 0.0} | dict.fromkeys(all_variants, 0.0)
    r_max = max(min(matrix_shape(base, ns[0])) for ns in by_kind.values())

    def add(variant: str, key: str, value: Tensor) -> None:
        rows.setdefault(variant, {}).setdefault(key, []).append(value)

    for kind, kind_names in by_kind.items():
        if progress is not None:
            progress(f"weights: {kind} matrices of {len(kind_names)} layers")
        t0 = time.perf_counter()
        w0 = read_stack(base, kind_names)
        if k_max > min(w0.shape[-2:]):
            raise ConfigError(
                f"k={k_max} is larger than the rank bound {min(w0.shape[-2:])} of the {kind} matrices "
                f"({w0.shape[-2]}×{w0.shape[-1]}); choose k <= {min(w0.shape[-2:])}"
            )
        u0, s0 = linalg.left_basis(w0)
        base_rows.append(_pad(s0, r_max))
        seconds["base"] += time.perf_counter() - t0
        guess0 = u0[..., : k_max + 5] if k_max else None
        for v, model in variants.items():
            t0 = time.perf_counter()
            wt = read_stack(model, kind_names)
            _check_shapes(w0, wt, kind_names, v)
            delta = wt - w0
            scale = 1.0 if scales is None else float(scales.get(v, 1.0))
            if scale != 1.0:  # an extrapolated (or shrunk) task vector: W0 + scale·ΔW
                delta = scale * delta
                wt = w0 + delta
            lefts: list[Tensor | None] = [None] * len(kind_names)
            ds = None
            if spectrum:
                ds, lefts = _delta_sigma(model, kind_names, delta)
                if scale != 1.0:
                    ds = ds * abs(scale)
                add(v, "delta_sigma", _pad(ds, r_max))
            seconds[v] += time.perf_counter() - t0
            updates = [(v, wt, delta, lefts)]
            for b in baselines:
                t1 = time.perf_counter()
                noise = _synthetic(b, ds, w0.shape, gen)
                updates.append((f"{b}:{v}", w0 + noise, noise, [None] * len(kind_names)))
                add(f"{b}:{v}", "delta_sigma", _pad(linalg.singular_values64(noise), r_max))
                seconds[f"{b}:{v}"] += time.perf_counter() - t1
            if not k_max:
                continue
            for name, w, d, left in updates:
                t1 = time.perf_counter()
                sketch = d @ torch.randn(d.shape[0], d.shape[-1], 5, generator=gen)
                if all(x is not None for x in left):
                    sketch = torch.stack([x[:, :5] for x in left])  # ΔW's own top directions
                guess = torch.cat([guess0, sketch], dim=-1)
                ut, st = linalg.top_left(w, k_max, guess=guess, tol=tol, generator=gen)
                sim, idx = linalg.best_match(ut, u0)
                add(name, "max_sim", sim)
                add(name, "best_index", idx)
                add(name, "top_sigma", st)
                if keep_vectors:
                    vectors[name].update(zip(kind_names, ut.unbind(0), strict=True))
                seconds[name] += time.perf_counter() - t1
    result = PassOutput(
        names=out_names, variants=all_variants, base_sigma=torch.cat(base_rows), vectors=vectors
    )
    for v, fields in rows.items():
        for key, parts in fields.items():
            getattr(result, key)[v] = torch.cat(parts)
    result.seconds = {k: round(s, 3) for k, s in seconds.items()}
    return result


def matrix_shape(model: LoadedModel, name: MatrixName) -> tuple[int, int]:
    d = model.dims
    q, kv = d.n_heads * d.d_head, d.n_kv_heads * d.d_head
    return {
        "q": (q, d.d_model),
        "k": (kv, d.d_model),
        "v": (kv, d.d_model),
        "o": (d.d_model, q),
        "gate": (d.d_mlp, d.d_model),
        "up": (d.d_mlp, d.d_model),
        "down": (d.d_model, d.d_mlp),
    }[name.kind]
