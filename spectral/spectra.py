"""Singular spectra of every linear weight matrix of a base model and of each fine-tune's update.

Per matrix (``q``/``k``/``v``/``o``/``gate``/``up``/``down`` of every layer): the base's singular values,
the singular values of the update ``ΔW = W_tuned − W_base`` (from the LoRA factors when the tuned model is
the adapter-on view of a peft model, never forming ``B @ A``; otherwise from the dense difference with a
float64 Gram matrix so that a rank-1 update does not acquire a float32 noise floor), and two summaries of
the update's rank:

* **effective rank** (Roy & Vetterli 2007): ``exp(H(p))``, ``p_i = σ_i / Σ_j σ_j`` — equals ``r`` for
  ``r`` equal singular values, 1 for rank one;
* **stable rank**: ``‖ΔW‖_F² / ‖ΔW‖_2²``.

Example (``family``: a tiny 4-layer Llama and two fine-tunes of it, ``full`` (a dense update) and
``lora`` (a merged rank-2 update)):
    >>> res = spectra(family.base, family.variants)
    >>> tuple(res.delta_sigma.shape)  # variant × matrix (4 layers × 7 kinds) × singular value
    (2, 28, 64)
    >>> res.to_frame().groupby("variant").effective_rank.max().round()
    variant
    full    59.0
    lora     2.0
    Name: effective_rank, dtype: float64
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from spectral import linalg
from spectral.engine import run_pass, select_names
from tunelens.errors import ConfigError
from tunelens.models.loaded import LoadedModel
from tunelens.results import Result
from tunelens.weights import MATRIX_KINDS, MatrixName


@dataclass(frozen=True, kw_only=True)
class SpectrumConfig:
    kinds: tuple[str, ...] = MATRIX_KINDS
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class SpectrumResult(Result):
    """``base_sigma`` ``[matrix, r_max]`` and ``delta_sigma`` ``[variant, matrix, r_max]`` (descending,
    zero-padded to the widest matrix's rank)."""

    title: ClassVar[str] = "Weight spectra and update rank"
    analysis: ClassVar[str] = "intruders"
    config: SpectrumConfig
    variants: tuple[str, ...]
    matrices: tuple[str, ...]
    base_sigma: Tensor
    delta_sigma: Tensor
    provenance: dict = field(default_factory=dict)

    def effective_rank(self) -> Tensor:
        """``[variant, matrix]`` entropy effective rank of each update."""
        return linalg.effective_rank(self.delta_sigma.double()).float()

    def stable_rank(self) -> Tensor:
        return linalg.stable_rank(self.delta_sigma.double()).float()

    def to_frame(self):
        """One row per (variant, matrix): update norms, top singular value, relative size, ranks."""
        import pandas as pd

        er, sr = self.effective_rank(), self.stable_rank()
        rows = []
        for i, v in enumerate(self.variants):
            for j, m in enumerate(self.matrices):
                name = MatrixName.parse(m)
                ds, bs = self.delta_sigma[i, j], self.base_sigma[j]
                rows.append(
                    {
                        "variant": v,
                        "matrix": m,
                        "layer": name.layer,
                        "kind": name.kind,
                        "delta_fro": float(ds.norm()),
                        "delta_sigma1": float(ds[0]),
                        "relative_fro": float(ds.norm() / bs.norm()),
                        "effective_rank": float(er[i, j]),
                        "stable_rank": float(sr[i, j]),
                    }
                )
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        er = self.effective_rank()
        rel = self.delta_sigma.norm(dim=-1) / self.base_sigma.norm(dim=-1)
        out: dict[str, Any] = {}
        for i, v in enumerate(self.variants):
            out[f"median_effective_rank[{v}]"] = round(float(er[i].median()), 2)
            out[f"median_relative_update[{v}]"] = round(float(rel[i].median()), 5)
        return out

    def figure(self, view: Literal["rank", "spectrum"] = "rank", matrix: str | None = None):
        """``rank``: effective rank of ΔW by layer, one panel per kind; ``spectrum``: normalised singular
        values of ΔW (and of the base) for one ``matrix`` (default the first)."""
        import plotly.express as px
        import plotly.graph_objects as go

        if view == "rank":
            return px.line(
                self.to_frame(),
                x="layer",
                y="effective_rank",
                color="variant",
                facet_col="kind",
                facet_col_wrap=4,
                log_y=True,
                markers=True,
                labels={"effective_rank": "effective rank of ΔW (exp entropy)", "layer": "layer"},
                title="Effective rank of the fine-tuning update per matrix",
            )
        if view == "spectrum":
            m = matrix or self.matrices[0]
            if m not in self.matrices:
                raise ConfigError(f"matrix {m!r} was not analysed; choose one of {self.matrices[:5]}…")
            j = self.matrices.index(m)
            fig = go.Figure()
            bs = self.base_sigma[j]
            keep = bs > 0
            fig.add_scatter(y=(bs[keep] / bs[0]).numpy(), name="base W (÷σ₁)", mode="lines")
            for i, v in enumerate(self.variants):
                ds = self.delta_sigma[i, j]
                fig.add_scatter(y=(ds[keep] / bs[0]).numpy(), name=f"ΔW {v} (÷σ₁ of base)", mode="lines")
            fig.update_layout(
                title=f"Singular values of {m}",
                xaxis_title="index (largest first)",
                yaxis_title="singular value / base σ₁",
                yaxis_type="log",
            )
            return fig
        raise ConfigError(f"unknown view {view!r}; expected 'rank' or 'spectrum'")


def spectra(
    base: LoadedModel,
    variants: Mapping[str, LoadedModel],
    config: SpectrumConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> SpectrumResult:
    """Spectra of the base matrices and of each variant's update (see the module doc)."""
    config = config or SpectrumConfig()
    names = select_names(base.dims.n_layers, config.kinds, config.layers, available=base.family.matrix_kinds)
    out = run_pass(base, variants, names, k_max=0, spectrum=True, progress=progress)
    v_names = tuple(variants)
    return SpectrumResult(
        config=config,
        variants=v_names,
        matrices=tuple(str(n) for n in out.names),
        base_sigma=out.base_sigma,
        delta_sigma=torch.stack([out.delta_sigma[v] for v in v_names]),
        provenance={"base": {"name": base.name, "hash": base.content_hash}}
        | {v: {"name": m.name, "hash": m.content_hash} for v, m in variants.items()}
        | {"seconds": out.seconds},
    )
