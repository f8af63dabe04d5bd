"""Intruder dimensions (Shuttleworth et al., arXiv 2410.21228; spec §4) and their causal test.

For each weight matrix, the top ``k`` left singular vectors of the tuned matrix are compared with *all*
left singular vectors of the base matrix: ``m_j = max_i |u_tuned_jᵀ u_base_i|``. A tuned vector is an
*intruder* when ``m_j < ε`` (defaults ``k = 10``, ``ε = 0.5``, as in the paper and PEFT). The result keeps
``m_j`` for the top ``k_max`` vectors, so counts for any ``k ≤ k_max`` and any ``ε`` are free (the sweeps).

Baselines make a zero count informative: ``rotated:V`` puts variant ``V``'s update spectrum on random
singular vectors, ``rank1:V`` puts its whole Frobenius norm on one random rank-1 direction. If a real
variant has no intruders while ``rank1:V`` has, the update is big enough but points along the base's own
directions; if neither has, the update is simply too small to displace any top-``k`` direction.

The causal test scales the intruder components of the tuned matrices,
``W' = W_t + (λ − 1) Σ_{j ∈ I} u_j u_jᵀ W_t`` (= ``u_j σ_j v_jᵀ`` of ``W_t``, PEFT's "merged" variant), and
measures task accuracy against the loss on the base model's own samples (:mod:`spectral.drift`).

Example (``family``: a tiny 4-layer Llama and two fine-tunes of it, ``full`` (a dense update of about a
tenth of each matrix) and ``lora`` (a merged rank-2 update); ``zoo.load_family("smollm2-et")`` is the real
family of SmolLM2 fine-tunes):
    >>> res = intruder_family(family.base, family.variants, IntruderConfig())
    >>> res.variants  # the fine-tunes and their baselines
    ('full', 'lora', 'rotated:full', 'rotated:lora', 'rank1:full', 'rank1:lora')
    >>> counts = res.counts(k=10, epsilon=0.5)  # over all 28 matrices
    >>> counts["full"], counts["lora"] > 20  # the dense update keeps the base's top directions
    (0, True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from spectral.drift import GeneralText, continuation_loss
from spectral.engine import BASELINES, PassOutput, read_stack, run_pass, select_names
from tunelens.errors import ConfigError
from tunelens.models.loaded import LoadedModel
from tunelens.models.pair import ModelPair
from tunelens.readout import answer_accuracy
from tunelens.results import Result
from tunelens.tasks.base import Encoded
from tunelens.weights import MATRIX_KINDS, MatrixName, read_matrix, swapped_matrices

log = logging.getLogger(__name__)

EPSILON_SWEEP: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
K_SWEEP: tuple[int, ...] = (1, 2, 5, 10, 20)


def _check_k_eps(k: int, epsilon: float, what: str = "") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{what}k must be an integer >= 1 (top singular vectors checked), got {k!r}")
    if not 0 < epsilon <= 1:
        raise ConfigError(
            f"{what}epsilon must be in (0, 1] (a bound on an absolute cosine), got {epsilon!r}; "
            "the paper uses 0.5"
        )


@dataclass(frozen=True, kw_only=True)
class IntruderConfig:
    """Which matrices, how many top vectors, which threshold, which baselines.

    ``k_max`` (default: the largest of ``k`` and :data:`K_SWEEP` that fits every matrix) is how many
    top tuned vectors are kept for the sweeps; ``baselines`` are built per variant (see the module doc).
    ``heatmap_matrix`` (``"L5.v"``) is the matrix whose similarity map is stored; by default the one with
    the lowest best-match in the first variant.
    """

    k: int = 10
    epsilon: float = 0.5
    k_max: int | None = None
    kinds: tuple[str, ...] = MATRIX_KINDS
    layers: tuple[int, ...] | None = None
    baselines: tuple[str, ...] = ("rotated", "rank1")
    heatmap_matrix: str | None = None
    heatmap_size: int = 24
    tol: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        _check_k_eps(self.k, self.epsilon)
        if self.k_max is not None and self.k_max < self.k:
            raise ConfigError(f"k_max ({self.k_max}) must be >= k ({self.k})")
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError(f"unknown baseline {b!r}; expected some of {', '.join(BASELINES)}")
        if self.heatmap_matrix is not None:
            MatrixName.parse(self.heatmap_matrix)
        if self.heatmap_size < 2:
            raise ConfigError(f"heatmap_size must be >= 2, got {self.heatmap_size}")
        if not 0 < self.tol < 1:
            raise ConfigError(f"tol must be in (0, 1), got {self.tol}")


@dataclass(frozen=True, kw_only=True)
class IntruderResult(Result):
    """Best-match similarities of the top tuned singular vectors, per variant and matrix.

    ``max_sim``, ``sigma`` and ``best_index`` are ``[variant, matrix, k_max]`` (``sigma``: the tuned
    singular values; ``best_index``: which base vector matched best). ``tradeoff`` is the λ causal test
    (one row per variant and λ), empty if not run.
    """

    title: ClassVar[str] = "Intruder dimensions"
    analysis: ClassVar[str] = "intruders"
    config: IntruderConfig
    variants: tuple[str, ...]
    matrices: tuple[str, ...]
    max_sim: Tensor
    sigma: Tensor
    best_index: Tensor
    heatmap_matrix: str
    heatmaps: Tensor  # [variant, heatmap_size, heatmap_size] |U_tᵀ U_0| on the top vectors of both
    update_ratio: Tensor  # [variant, matrix] σ1(ΔW) / σ_k(W_base): how close the update comes to the top k
    tradeoff: Any = None  # pandas DataFrame or None
    provenance: dict = field(default_factory=dict)

    # -- numbers ---------------------------------------------------------------------------------
    def is_intruder(self, k: int | None = None, epsilon: float | None = None) -> Tensor:
        """Boolean ``[variant, matrix, k]``: which of the top ``k`` tuned vectors are intruders."""
        k = self.config.k if k is None else k
        epsilon = self.config.epsilon if epsilon is None else epsilon
        _check_k_eps(k, epsilon)
        if k > self.max_sim.shape[-1]:
            raise ConfigError(f"k={k} exceeds the {self.max_sim.shape[-1]} vectors kept (k_max)")
        return self.max_sim[..., :k] < epsilon

    def counts(self, k: int | None = None, epsilon: float | None = None) -> dict[str, int]:
        """Intruders summed over all matrices, per variant."""
        per = self.is_intruder(k, epsilon).sum(dim=(1, 2))
        return {v: int(c) for v, c in zip(self.variants, per, strict=True)}

    def sweep(self, ks: Sequence[int] = K_SWEEP, epsilons: Sequence[float] = EPSILON_SWEEP):
        """Counts for every (k, ε) that fits ``k_max``: a tidy frame variant × k × ε."""
        import pandas as pd

        rows = [
            {"variant": v, "k": k, "epsilon": e, "intruders": c}
            for k in ks
            if k <= self.max_sim.shape[-1]
            for e in epsilons
            for v, c in self.counts(k, e).items()
        ]
        return pd.DataFrame(rows)

    def to_frame(self):
        """One row per (variant, matrix, j): best match, tuned singular value, intruder at (k, ε)."""
        import pandas as pd

        n_var, n_mat, k_max = self.max_sim.shape
        names = [MatrixName.parse(m) for m in self.matrices]
        j = np.arange(k_max)
        return pd.DataFrame(
            {
                "variant": np.repeat(self.variants, n_mat * k_max),
                "matrix": np.tile(np.repeat(self.matrices, k_max), n_var),
                "layer": np.tile(np.repeat([n.layer for n in names], k_max), n_var),
                "kind": np.tile(np.repeat([n.kind for n in names], k_max), n_var),
                "j": np.tile(j, n_var * n_mat),
                "max_sim": self.max_sim.reshape(-1).numpy(),
                "sigma": self.sigma.reshape(-1).numpy(),
                "best_base_index": self.best_index.reshape(-1).numpy(),
                "intruder": ((self.max_sim < self.config.epsilon) & torch.from_numpy(j < self.config.k))
                .reshape(-1)
                .numpy(),
            }
        )

    def by_layer(self, k: int | None = None, epsilon: float | None = None):
        """Counts per variant, layer and matrix kind."""
        df = self.to_frame()
        k = self.config.k if k is None else k
        epsilon = self.config.epsilon if epsilon is None else epsilon
        df = df[df.j < k].assign(intruder=lambda d: d.max_sim < epsilon)
        return df.groupby(["variant", "layer", "kind"], as_index=False)["intruder"].sum()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.config.k, "epsilon": self.config.epsilon}
        out |= {f"intruders[{v}]": c for v, c in self.counts().items()}
        out |= {
            f"min_best_match[{v}]": round(float(self.max_sim[i, :, : self.config.k].min()), 3)
            for i, v in enumerate(self.variants)
        }
        if self.tradeoff is not None and len(self.tradeoff):
            for (v, eps), grp in self.tradeoff.groupby(["variant", "epsilon"]):
                lo, one = grp.loc[grp["lambda"].idxmin()], grp[grp["lambda"] == 1.0]
                if len(one) and int(lo.n_directions):
                    out[f"lambda{lo['lambda']:g}@eps{eps:g}[{v}]"] = {
                        "directions": int(lo.n_directions),
                        "accuracy": round(float(lo.accuracy), 3),
                        "accuracy_at_1": round(float(one.accuracy.iloc[0]), 3),
                        "general_loss": round(float(lo.general_loss), 4),
                        "general_loss_at_1": round(float(one.general_loss.iloc[0]), 4),
                    }
        return out

    # -- figures ---------------------------------------------------------------------------------
    def figure(
        self,
        view: Literal["epsilon", "heatmap", "layer", "rank", "tradeoff"] = "epsilon",
        variant: str | None = None,
    ):
        """``epsilon``: intruders vs ε (k fixed), one line per variant; ``heatmap``: |U_tᵀU_0| of the
        chosen matrix for ``variant``; ``layer``: counts by layer and kind; ``rank``: counts vs LoRA rank
        (variants named ``…-rN``, full at the right); ``tradeoff``: accuracy vs general-text loss under λ."""
        import plotly.express as px
        import plotly.graph_objects as go

        k, eps = self.config.k, self.config.epsilon
        if view == "epsilon":
            df = self.sweep(ks=(k,))
            return px.line(
                df,
                x="epsilon",
                y="intruders",
                color="variant",
                markers=True,
                labels={
                    "epsilon": "ε (best-match threshold, |cos|)",
                    "intruders": f"intruders (top {k}, all matrices)",
                },
                title=f"Intruder dimensions vs ε, top {k} tuned singular vectors",
            )
        if view == "heatmap":
            i = self.variants.index(variant) if variant is not None else 0
            fig = go.Figure(
                go.Heatmap(
                    z=self.heatmaps[i].numpy(),
                    colorscale="Viridis",
                    zmin=0,
                    zmax=1,
                    colorbar={"title": "|cos|"},
                )
            )
            fig.update_layout(
                title=f"{self.heatmap_matrix}: |U_tunedᵀ U_base|, {self.variants[i]}",
                xaxis_title="base singular vector (rank, largest first)",
                yaxis_title="tuned singular vector (rank, largest first)",
                yaxis_autorange="reversed",
            )
            return fig
        if view == "layer":
            df = self.by_layer()
            if variant is not None:
                df = df[df.variant == variant]
            return px.bar(
                df,
                x="layer",
                y="intruder",
                color="kind",
                facet_row="variant",
                labels={"intruder": "intruders", "layer": "layer"},
                title=f"Intruders by layer and matrix kind (k={k}, ε={eps})",
            )
        if view == "rank":
            rows = []
            for v, c in self.counts().items():
                if ":" in v:
                    continue
                r = _rank_of(v)
                rows.append({"variant": v, "rank": str(r) if r else "full", "intruders": c})
            return px.bar(
                rows,
                x="rank",
                y="intruders",
                text="intruders",
                labels={
                    "rank": "LoRA rank (full = full fine-tune)",
                    "intruders": f"intruders (k={k}, ε={eps})",
                },
                title="Intruders vs LoRA rank",
            )
        if view == "tradeoff":
            if self.tradeoff is None or not len(self.tradeoff):
                raise ConfigError("this result has no λ trade-off; run intruder_tradeoff first")
            df = self.tradeoff[self.tradeoff.n_directions > 0].assign(
                curve=lambda d: d.variant + ", ε=" + d.epsilon.astype(str)
            )
            return px.line(
                df,
                x="general_loss",
                y="accuracy",
                color="curve",
                text="lambda",
                markers=True,
                labels={
                    "general_loss": "loss on base-model samples (nats/token)",
                    "accuracy": "task accuracy (held out)",
                },
                title="Scaling intruder singular values by λ: task accuracy vs drift",
            )
        raise ConfigError(f"unknown view {view!r}; expected epsilon, heatmap, layer, rank or tradeoff")


def _rank_of(variant: str) -> int | None:
    import re

    m = re.search(r"-r(\d+)$", variant)
    return int(m[1]) if m else None


# ------------------------------------------------------------------------------------------- analysis


def _k_max(config: IntruderConfig, names: Sequence[MatrixName], base: LoadedModel) -> int:
    from spectral.engine import matrix_shape

    bound = min(min(matrix_shape(base, n)) for n in names)
    if config.k > bound:
        worst = min(names, key=lambda n: min(matrix_shape(base, n)))
        raise ConfigError(
            f"k={config.k} is larger than the rank of matrix {worst} "
            f"({'×'.join(map(str, matrix_shape(base, worst)))}, rank <= {bound}); choose k <= {bound}"
        )
    if config.k_max is not None:
        if config.k_max > bound:
            raise ConfigError(
                f"k_max={config.k_max} is larger than the rank bound {bound} of matrix kinds chosen"
            )
        return config.k_max
    return min(bound, max(config.k, *K_SWEEP))


def intruder_family(
    base: LoadedModel,
    variants: Mapping[str, LoadedModel],
    config: IntruderConfig | None = None,
    *,
    scales: Mapping[str, float] | None = None,
    progress: Callable[[str], None] | None = None,
    keep_vectors: bool = False,
) -> IntruderResult | tuple[IntruderResult, PassOutput]:
    """Intruder analysis of several fine-tunes of one base (the base is decomposed once).

    ``scales`` extrapolates a variant's update (``W0 + s·ΔW``; name the variant as you like). With
    ``keep_vectors`` it also returns the engine output holding the top tuned vectors (for the λ test).
    """
    config = config or IntruderConfig()
    names = select_names(base.dims.n_layers, config.kinds, config.layers, available=base.family.matrix_kinds)
    k_max = _k_max(config, names, base)
    out = run_pass(
        base,
        variants,
        names,
        k_max=k_max,
        spectrum=bool(config.baselines),
        baselines=config.baselines,
        keep_vectors=keep_vectors,
        scales=scales,
        tol=config.tol,
        seed=config.seed,
        progress=progress,
    )
    result = _to_result(out, config, base, variants, k_max)
    return (result, out) if keep_vectors else result


def intruders(
    pair: ModelPair, config: IntruderConfig | None = None, *, progress: Callable[[str], None] | None = None
) -> IntruderResult:
    """Intruder analysis of one pair (see :func:`intruder_family`)."""
    return intruder_family(pair.base, {pair.tuned.name: pair.tuned}, config, progress=progress)  # type: ignore[return-value]


def _to_result(
    out: PassOutput,
    config: IntruderConfig,
    base: LoadedModel,
    variants: Mapping[str, LoadedModel],
    k_max: int,
) -> IntruderResult:
    v_names = tuple(out.variants)
    max_sim = torch.stack([out.max_sim[v] for v in v_names])
    names = out.names
    k_idx = min(config.k, out.base_sigma.shape[1]) - 1
    ratio = torch.stack(
        [
            out.delta_sigma[v][:, 0] / out.base_sigma[:, k_idx]
            if v in out.delta_sigma
            else torch.full((len(names),), float("nan"))
            for v in v_names
        ]
    )
    heat_name = (
        MatrixName.parse(config.heatmap_matrix)
        if config.heatmap_matrix
        else names[int(max_sim[0, :, : config.k].min(-1).values.argmin())]
    )
    if heat_name not in names:
        raise ConfigError(f"heatmap_matrix {heat_name} is not among the analysed matrices")
    heatmaps = torch.stack([_heatmap(base, variants.get(v), heat_name, config) for v in v_names])
    provenance = {"base": {"name": base.name, "hash": base.content_hash}} | {
        v: {"name": m.name, "hash": m.content_hash} for v, m in variants.items()
    }
    return IntruderResult(
        config=replace(config, k_max=k_max),
        variants=v_names,
        matrices=tuple(str(n) for n in names),
        max_sim=max_sim,
        sigma=torch.stack([out.top_sigma[v] for v in v_names]),
        best_index=torch.stack([out.best_index[v] for v in v_names]),
        heatmap_matrix=str(heat_name),
        heatmaps=heatmaps,
        update_ratio=ratio,
        provenance=provenance | {"seconds": out.seconds},
    )


def _heatmap(
    base: LoadedModel,
    model: LoadedModel | None,
    name: MatrixName,
    config: IntruderConfig,
) -> Tensor:
    """|U_tᵀ U_0| over the top ``heatmap_size`` vectors of both (exact SVD of one matrix); NaN for a
    synthetic baseline."""
    n = min(config.heatmap_size, *_dims(base, name))
    blank = torch.full((config.heatmap_size, config.heatmap_size), float("nan"))
    if model is None:
        return blank
    w0 = read_stack(base, [name])[0]
    wt = read_stack(model, [name])[0]
    u0 = torch.linalg.svd(w0, full_matrices=False)[0][:, :n]
    ut = torch.linalg.svd(wt, full_matrices=False)[0][:, :n]
    blank[:n, :n] = (ut.T @ u0).abs()
    return blank


def _dims(base: LoadedModel, name: MatrixName) -> tuple[int, int]:
    from spectral.engine import matrix_shape

    return matrix_shape(base, name)


# ------------------------------------------------------------------------------------ causal test


@contextmanager
def scaled_intruders(
    model: LoadedModel, vectors: Mapping[MatrixName, Tensor], lam: float
) -> Iterator[LoadedModel]:
    """Temporarily scale the components along ``vectors`` (``[d_out, n]`` orthonormal intruder vectors of
    each matrix's *tuned* weight) by ``lam``: ``W' = W + (λ − 1) U Uᵀ W``. Restores the weights on exit."""
    values = {}
    with model.active() as module:
        for name, u in vectors.items():
            if u.shape[-1] == 0:
                continue
            effective = read_matrix(module, name)
            stored = read_matrix(module, name, adapter=False) if model.adapter else effective
            values[name] = stored + (lam - 1.0) * u @ (u.T @ effective)
    with swapped_matrices(model.module, values):
        yield model


def intruder_vectors(
    result: IntruderResult,
    out: PassOutput,
    variant: str,
    *,
    k: int | None = None,
    epsilon: float | None = None,
) -> dict[MatrixName, Tensor]:
    """The intruder vectors of ``variant`` at (k, ε), per matrix that has any."""
    flags = result.is_intruder(k, epsilon)[result.variants.index(variant)]
    vecs = {}
    for i, name in enumerate(result.matrices):
        sel = flags[i].nonzero().flatten()
        if len(sel):
            mn = MatrixName.parse(name)
            vecs[mn] = out.vectors[variant][mn][:, sel]
    return vecs


def intruder_tradeoff(
    result: IntruderResult,
    out: PassOutput,
    models: Mapping[str, LoadedModel],
    task: Encoded,
    general: GeneralText,
    *,
    lambdas: Sequence[float] = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5),
    k: int | None = None,
    epsilons: Sequence[float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> IntruderResult:
    """The λ causal test for each model in ``models`` (variant name -> model) and each ε (default: the
    analysis's); returns ``result`` with its ``tradeoff`` frame: variant, λ, ε, number of scaled
    directions, task accuracy (restricted to candidates), loss on the general text. λ = 1, or no intruder
    at that ε, is the unmodified tuned model (evaluated once per variant)."""
    import pandas as pd

    k = result.config.k if k is None else k
    epsilons = (result.config.epsilon,) if epsilons is None else tuple(epsilons)
    for eps in epsilons:
        _check_k_eps(k, eps, "tradeoff: ")
    if not lambdas or not epsilons:
        raise ConfigError("lambdas and epsilons must not be empty")
    rows = []
    cache: dict[tuple, tuple[float, float]] = {}
    for v, model in models.items():
        if v not in result.variants or not out.vectors.get(v):
            raise ConfigError(
                f"variant {v!r} has no kept vectors; run intruder_family(..., keep_vectors=True)"
            )
        for eps in epsilons:
            vecs = intruder_vectors(result, out, v, k=k, epsilon=eps)
            n_dirs = sum(u.shape[-1] for u in vecs.values())
            for lam in lambdas:
                key = (v, eps, lam) if n_dirs and lam != 1.0 else (v,)  # (v,): the unmodified model
                if key not in cache:
                    if progress is not None:
                        progress(f"intruder λ test: {v}, ε={eps:g}, λ={lam:g} ({n_dirs} directions)")
                    with scaled_intruders(model, vecs, lam), model.active() as module:
                        cache[key] = (answer_accuracy(module, task)[0], continuation_loss(module, general))
                acc, loss = cache[key]
                rows.append(
                    {
                        "variant": v,
                        "lambda": float(lam),
                        "k": k,
                        "epsilon": eps,
                        "n_directions": n_dirs,
                        "accuracy": acc,
                        "general_loss": loss,
                    }
                )
    return replace(
        result,
        tradeoff=pd.DataFrame(rows),
        provenance=result.provenance | {"general_text": general.describe(), "task_items": len(task)},
    )


__all__ = [
    "EPSILON_SWEEP",
    "K_SWEEP",
    "IntruderConfig",
    "IntruderResult",
    "intruder_family",
    "intruder_tradeoff",
    "intruder_vectors",
    "intruders",
    "scaled_intruders",
]
