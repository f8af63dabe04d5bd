"""The layer atlas: everything the analyses found at one layer, and the geometry linking its weights to them.

Two parts:

* **Findings** — for each saved result in a results folder, the rows of its ``to_frame()`` that belong to
  the layer, read from the column the result's type declares (:attr:`Result.layer_column
  <tunelens.results.Result.layer_column>`: a layer number, a Site, a site such as ``resid_post.5`` or a
  matrix name such as ``L5.q``): probe accuracy, patching / CMAP effects of the layer's heads, intruder
  dimensions. A result that declares no layer column has no rows at a layer.
* **Geometry** — cosines between the singular vectors of the layer's matrices that live in the residual
  stream and the :class:`~tunelens.directions.Direction` s (probe weights, the context knob) read at the
  matching residual sites, in raw activation space:

  ======  ======  =============================================  ===========================
  matrix  side    residual-space vectors                         compared with directions at
  ======  ======  =============================================  ===========================
  o       write   left singular vectors of ``G_o · W_o``         ``resid_mid.L``, ``attn_out.L``
  down    write   left singular vectors of ``G_d · W_down``      ``resid_post.L``, ``mlp_out.L``,
                                                                 ``resid_pre.(L+1)``
  q k v   read    right singular vectors of ``W · G_in``         ``resid_pre.L``
  gate up read    right singular vectors of ``W · G_mlp``        ``resid_mid.L``
  ======  ======  =============================================  ===========================

  ``G`` is the diagonal gain of the RMSNorm between the matrix and the residual stream: none on the write
  side of Llama (the identity), Gemma-3's post-attention / post-feed-forward norms on its write side, the
  input / pre-MLP norm on every read side (the norm's division by the RMS is a scalar and does not change
  directions). The output sides of q, k, v, gate and up (head and MLP spaces) and the input sides of o
  and down are never compared with residual directions, even where the widths happen to agree.

  Each matrix is decomposed for the base, the tuned model and their difference ``tuned − base`` (what the
  fine-tune wrote). A cosine's sign is arbitrary (singular vectors are defined up to sign), so ``|cos|``
  is reported, with the chance level of a random direction, ``sqrt(2 / (π d_model))``, and the fraction
  of each direction's squared length inside the top-k subspace (chance ``k / d_model``).

What is kept between calls (decompositions by matrix content, results' frames, loaded results) lives in
an :class:`AtlasCache` the caller holds and passes in (the app keeps one per server); without one, each
call makes its own and nothing is shared.

Example:
    >>> import torch
    >>> from tunelens.faces.atlas import top_singular
    >>> u, s = top_singular(torch.diag(torch.tensor([3.0, 1.0])), 1, side="write")
    >>> u[:, 0].abs().tolist(), s.tolist()
    ([1.0, 0.0], [3.0])
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tunelens.directions import Direction
from tunelens.errors import ConfigError, PairIncompatibleError, StoreError, TunelensError
from tunelens.results import Result, load_result, pair_provenance
from tunelens.sites import Site
from tunelens.threads import one_thread
from tunelens.weights import MatrixName, read_matrix

log = logging.getLogger(__name__)

Side = Literal["write", "read"]
ROLES = ("base", "tuned", "delta")


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """One matrix kind, the side whose singular vectors live in the residual stream, and the sites of
    directions it may be compared with (``layer_offset`` 1 means the next layer's site)."""

    kind: str
    side: Side
    sites: tuple[tuple[str, int], ...]


COMPARISONS: tuple[Comparison, ...] = (
    Comparison(kind="o", side="write", sites=(("resid_mid", 0), ("attn_out", 0))),
    Comparison(kind="down", side="write", sites=(("resid_post", 0), ("mlp_out", 0), ("resid_pre", 1))),
    Comparison(kind="q", side="read", sites=(("resid_pre", 0),)),
    Comparison(kind="k", side="read", sites=(("resid_pre", 0),)),
    Comparison(kind="v", side="read", sites=(("resid_pre", 0),)),
    Comparison(kind="gate", side="read", sites=(("resid_mid", 0),)),
    Comparison(kind="up", side="read", sites=(("resid_mid", 0),)),
)


@dataclass(frozen=True, kw_only=True)
class AtlasConfig:
    """``layer`` to show, ``k`` singular vectors per matrix, ``kinds`` of matrices to decompose."""

    layer: int
    k: int = 8
    kinds: tuple[str, ...] = ("o", "down", "q", "k", "v", "gate", "up")

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(f"layer must be an int >= 0, got {self.layer!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k must be an int >= 1, got {self.k!r}")
        known = {c.kind for c in COMPARISONS}
        bad = [k for k in self.kinds if k not in known]
        if bad or not self.kinds:
            raise ConfigError(f"kinds must be a non-empty subset of {sorted(known)}, got {self.kinds!r}")


# -- the weights in residual space ---------------------------------------------------------------------
def residual_matrix(model: Any, layer: int, kind: str) -> Float[Tensor, "d_out d_in"]:
    """The matrix ``kind`` of ``layer`` with the norm's gain on its residual side folded in (the family's
    declaration says which norm: :meth:`tunelens.families.Family.norm_gain`).

    ``model`` is a :class:`~tunelens.models.loaded.LoadedModel` (its adapter state is respected). Write
    side (o, down): ``G · W``, whose column space is where the matrix writes in the residual stream.
    Read side (q, k, v, gate, up): ``W · G``, whose row space is what it reads from the residual stream.
    """
    comp = next((c for c in COMPARISONS if c.kind == kind), None)
    if comp is None:
        raise ConfigError(f"unknown matrix kind {kind!r}; expected one of {[c.kind for c in COMPARISONS]}")
    if not 0 <= layer < model.dims.n_layers:
        raise ConfigError(f"layer {layer} is outside the model's {model.dims.n_layers} layers")
    w = read_matrix(model.module, MatrixName(layer, kind), adapter=model.adapter is not False)  # type: ignore[arg-type]
    gain = model.family.norm_gain(model.module, layer, kind)  # the family's norm on the residual side
    if gain is None:
        return w
    gain = gain.cpu()
    return gain[:, None] * w if comp.side == "write" else w * gain[None, :]


def _n_computed(k: int, n: int) -> int:
    """How many top eigenpairs are computed for a request of ``k`` (``k`` up to 16: 16; else the next power
    of two), at most ``n``: the numbers of a given ``k`` never depend on what was asked before."""
    return min(n, 16 if k <= 16 else 1 << (k - 1).bit_length())


def _top_eigh(gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` eigenpairs of a symmetric PSD double matrix, largest first (LAPACK ``syevr`` on the
    top-``k`` index range only: the full decomposition's back-transformation of every vector is skipped)."""
    from scipy.linalg import eigh

    n = gram.shape[0]
    # a d_model × d_model eigh takes ~0.1 s on one core, but was measured at 1-25 s with 2 OpenMP threads
    # on a busy machine (threads spin waiting for a core)
    with one_thread():
        evals, evecs = eigh(gram.numpy(), subset_by_index=[n - k, n - 1], driver="evr")
    return torch.from_numpy(evals[::-1].copy()), torch.from_numpy(evecs[:, ::-1].copy())


def top_singular(matrix: Tensor, k: int, *, side: Side) -> tuple[Tensor, Tensor]:
    """The top ``k`` unit singular vectors on ``side`` (columns, ``d × k``) and their singular values.

    ``write``: left singular vectors (the output space); ``read``: right singular vectors (the input space).
    Vectors whose singular value is zero (below 1e-6 of the largest) are not defined and are left out. Each
    vector's sign is fixed so that its largest-magnitude entry is positive (a singular vector's sign is
    arbitrary; this makes it reproducible). Computed for :func:`_n_computed` vectors and cut to ``k``, so
    the answer for ``k`` is the same whether or not a decomposition was cached
    (:meth:`AtlasCache.top_singular`).
    """
    vecs, sigma = _top_singular(matrix, _n_computed(k, min(matrix.shape)), side)
    return vecs[:, :k], sigma[:k]


def _top_singular(matrix: Tensor, k: int, side: Side) -> tuple[Tensor, Tensor]:
    m = matrix.double()
    # Eigenvectors of the smaller Gram matrix (d × d with d the smaller side) give the singular vectors of
    # both sides: an SVD of a d_model × d_mlp matrix would do far more work than the few top vectors need.
    want_rows = side == "write"
    rows_smaller = m.shape[0] <= m.shape[1]
    gram = m @ m.T if rows_smaller else m.T @ m
    evals, vecs = _top_eigh(gram, k)
    sigma = evals.clamp_min(0).sqrt()
    keep = sigma > 1e-6 * sigma[0].clamp_min(1e-30)  # singular vectors of σ ≈ 0 are arbitrary: left out
    sigma, vecs = sigma[keep], vecs[:, keep]
    if want_rows != rows_smaller:  # the other side: u = M v / σ (write) or v = Mᵀ u / σ (read)
        vecs = (m @ vecs if want_rows else m.T @ vecs) / sigma
        vecs = vecs / vecs.norm(dim=0, keepdim=True)
    if vecs.numel():
        flip = vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True)).sign()
        vecs = vecs * torch.where(flip == 0, 1.0, flip)
    return vecs.float(), sigma.float()


def chance_cosine(d: int) -> float:
    """Mean ``|cos|`` between a fixed unit vector and a random one in ``d`` dimensions (large ``d``)."""
    return math.sqrt(2.0 / (math.pi * d))


# -- directions found in results -----------------------------------------------------------------------
def directions_in(result: Any, prefix: str = "") -> list[Direction]:
    """Every :class:`Direction` a result holds (fields, nested lists / dicts, or its ``directions()``)."""
    found: list[Direction] = []
    seen: set[int] = set()

    def visit(value: Any, path: str) -> None:
        if isinstance(value, Direction):
            if id(value) not in seen:
                seen.add(id(value))
                name = value.name or path
                found.append(dataclasses.replace(value, name=f"{prefix}{name}" if prefix else name))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                visit(v, f"{path}[{i}]")

    visit(result, "")
    method = getattr(result, "directions", None)
    if callable(method):
        try:
            extra = method()
        except TunelensError as exc:
            log.warning("%s.directions() failed: %s", type(result).__name__, exc)
            extra = []
        visit(list(extra.values()) if isinstance(extra, dict) else list(extra or []), "directions")
    return found


def layer_directions(result: Any, layers: Iterable[int], prefix: str = "") -> list[Direction]:
    """Directions a result computes per layer on request (a probe result's ``direction(role, layer)``)."""
    method = getattr(result, "direction", None)
    roles, have = getattr(result, "roles", None), getattr(result, "layers", None)
    if not callable(method) or not roles or have is None:
        return []
    out = []
    for layer in layers:
        if layer not in have:
            continue
        for role in roles:
            try:
                d = method(role, layer)
            except (TunelensError, TypeError, IndexError) as exc:
                log.warning("%s.direction(%r, %d) failed: %s", type(result).__name__, role, layer, exc)
                continue
            if isinstance(d, Direction):
                out.append(dataclasses.replace(d, name=f"{prefix}{d.name or role}"))
    return out


def _matches(comp: Comparison, site: Site, layer: int) -> bool:
    return any(
        site.kind == kind and site.layer == layer + off and site.head is None for kind, off in comp.sites
    )


# -- findings: rows of other results at this layer -----------------------------------------------------
def _layer_of_cell(value: Any) -> int | None:
    if isinstance(value, Site):
        return value.layer
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        if text.startswith("L") and "." in text:
            try:
                return MatrixName.parse(text).layer
            except ConfigError:
                return None
        try:
            return Site.parse(text).layer
        except TunelensError:
            return None
    return None


def row_layers(frame: Any, column: str | None):
    """The layer of each row of a result's frame, read from ``column`` (the result type's
    :attr:`~tunelens.results.Result.layer_column`), or None when there is none: no column declared, the
    frame has no such column, or none of its cells names a layer."""
    if column is None or frame is None or not hasattr(frame, "columns") or column not in frame.columns:
        return None
    layers = frame[column].map(_layer_of_cell)
    return layers if layers.notna().any() else None


def rows_at_layer(frame: Any, layer: int, column: str | None = "layer", layers: Any = None):
    """The rows of a result's frame that belong to ``layer``, by its layer ``column`` (None when it has no
    layer rows). ``layers``: the frame's :func:`row_layers`, when already known."""
    layers = row_layers(frame, column) if layers is None else layers
    if layers is None:
        return None
    return frame[layers == layer].reset_index(drop=True)


def result_rows_at_layer(result: Result, layer: int, cache: AtlasCache | None = None):
    """The rows of ``result.to_frame()`` at ``layer``, by the column its type declares
    (``type(result).layer_column``); None when it declares none or has no layer rows."""
    frame, layers = (cache or AtlasCache()).frame_layers(result)
    return rows_at_layer(frame, layer, layers=layers) if layers is not None else None


# -- what is kept between calls ------------------------------------------------------------------------
class AtlasCache:
    """What the atlas keeps between calls, held by the caller (the app keeps one per server process):

    * the top singular vectors of each matrix, keyed by the matrix's content, the side and the number of
      vectors computed (at most ``svd_size``, least recently used out): the page recomputes the atlas when
      the user moves between layers, changes k or the results folder changes;
    * each result's ``to_frame()`` and its rows' layers, per result object (dropped with the object);
    * the results loaded from a folder, per (folder, modification time of its result.json) (at most
      ``results_size``).

    Safe to share between threads (Streamlit sessions): each store is read and written under a lock; a
    value computed twice at once is the same value.
    """

    def __init__(self, *, svd_size: int = 256, results_size: int = 64) -> None:
        self.svd_size, self.results_size = svd_size, results_size
        self.svd: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
        self.frames: dict[int, tuple[Any, Any]] = {}
        self.loaded: OrderedDict[tuple[str, float], Result] = OrderedDict()
        self._lock = threading.Lock()

    def _lru(self, store: OrderedDict, size: int, key: Any, compute) -> Any:
        with self._lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
        value = compute()
        with self._lock:
            store[key] = value
            store.move_to_end(key)
            while len(store) > size:
                store.popitem(last=False)
        return value

    def top_singular(self, matrix: Tensor, k: int, *, side: Side) -> tuple[Tensor, Tensor]:
        """:func:`top_singular` through the cache: another ``k`` up to 16 reuses the same decomposition,
        and weights changed in place are never answered from it (the key is the matrix's content)."""
        n = _n_computed(k, min(matrix.shape))
        compute = functools.partial(_top_singular, matrix, n, side)
        vecs, sigma = self._lru(self.svd, self.svd_size, (_digest(matrix), side, n), compute)
        return vecs[:, :k], sigma[:k]

    def frame_layers(self, result: Result) -> tuple[Any, Any]:
        """``result.to_frame()`` and the layer of each of its rows (:func:`row_layers` of the column its
        type declares), computed once per result object (the atlas of every layer reads the same frames)."""
        key = id(result)
        with self._lock:
            hit = self.frames.get(key)
        if hit is not None:
            return hit
        frame = result.to_frame()
        value = (frame, row_layers(frame, type(result).layer_column))
        with self._lock:
            if key not in self.frames:
                self.frames[key] = value
                weakref.finalize(result, self.frames.pop, key, None)
            return self.frames[key]

    def load(self, path: str | os.PathLike[str], mtime: float) -> Result:
        """A saved result, loaded once per (folder, modification time of its result.json)."""
        key = (str(path), mtime)
        return self._lru(self.loaded, self.results_size, key, functools.partial(load_result, path))

    def clear(self) -> None:
        with self._lock:
            self.svd.clear()
            self.frames.clear()
            self.loaded.clear()


# -- the result ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AtlasResult(Result):
    """What is known about one layer. ``geometry``: one row per (matrix, model, direction, singular
    vector); ``spectra``: the top singular values; ``findings``: other results' rows at this layer."""

    title: ClassVar[str] = "Layer atlas"
    analysis: ClassVar[str] = "atlas"

    layer: int
    k: int
    d_model: int
    pair: dict[str, str]
    geometry: Any  # pandas.DataFrame
    spectra: Any  # pandas.DataFrame
    findings: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def to_frame(self):
        return self.geometry

    def best(self):
        """The largest ``|cos|`` of each (matrix, model, direction), with its singular vector's index."""
        g = self.geometry
        if len(g) == 0:
            return g
        idx = g.groupby(["matrix", "model", "direction"])["abs_cos"].idxmax()
        return g.loc[idx].sort_values("abs_cos", ascending=False).reset_index(drop=True)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": self.layer,
            "directions compared": int(self.geometry["direction"].nunique()) if len(self.geometry) else 0,
            "results with rows at this layer": len(self.findings),
            "chance |cos|": round(chance_cosine(self.d_model), 3),
        }
        best = self.best()
        if len(best):
            row = best.iloc[0]
            out["max |cos|"] = round(float(row["abs_cos"]), 3)
            out["max |cos| at"] = (
                f"{row['direction']} vs {row['matrix']} ({row['model']} weights), u{row['index']}"
            )
        return out

    def figure(self, model: str = "delta"):
        """``|cos|`` between each direction (rows) and the top singular vectors of each matrix (columns,
        grouped by matrix; blank where the direction's site is not where that matrix reads or writes) for
        ``model`` (base, tuned or delta = tuned − base), above the matrices' top singular values."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        if model not in ROLES:
            raise ConfigError(f"model must be one of {ROLES}, got {model!r}")
        g = self.geometry
        g = g[g["model"] == model] if len(g) else g
        has_dirs = len(g) > 0
        fig = make_subplots(
            rows=2 if has_dirs else 1,
            cols=1,
            row_heights=[0.55, 0.45] if has_dirs else None,
            subplot_titles=(["|cos| of each direction with each singular vector"] if has_dirs else [])
            + [f"top singular values of layer {self.layer}'s matrices ({model} weights)"],
            vertical_spacing=0.3,
        )
        if has_dirs:
            g = g.assign(
                column=[f"{m.split('.')[-1]} {'u' if s == 'write' else 'v'}{i}"
                        for m, s, i in zip(g["matrix"], g["side"], g["index"], strict=True)],
                label=_labels(g["direction"]),
            )  # fmt: skip
            columns = list(dict.fromkeys(g["column"]))
            table = g.pivot_table(index="label", columns="column", values="abs_cos", aggfunc="first")
            table = table.reindex(columns=columns)
            fig.add_trace(
                go.Heatmap(
                    z=table.to_numpy(),
                    x=columns,
                    y=list(table.index),
                    zmin=0,
                    zmax=1,
                    colorscale="Viridis",
                    colorbar={"title": {"text": "|cos|"}, "len": 0.5, "y": 0.8},
                    hovertemplate="%{y}<br>%{x}<br>|cos| %{z:.3f}<extra></extra>",
                    showlegend=False,
                ),
                row=1,
                col=1,
            )
            fig.update_xaxes(
                title_text="singular vector (u: left, write side; v: right, read side; 1 = largest)",
                tickangle=-60,
                row=1,
                col=1,
            )
            fig.update_yaxes(title_text="direction @ site", automargin=True, row=1, col=1)
        row = 2 if has_dirs else 1
        for (mat, role), sub in self.spectra.groupby(["matrix", "model"], sort=False):
            if role == model:
                fig.add_trace(
                    go.Scatter(x=sub["index"], y=sub["sigma"], mode="lines+markers", name=str(mat)),
                    row=row,
                    col=1,
                )
        fig.update_xaxes(title_text="singular value index (1 = largest)", row=row, col=1)
        fig.update_yaxes(title_text="singular value σ", type="log", row=row, col=1)
        what = (
            f"{model} weights vs the directions read there (chance |cos| ≈ {chance_cosine(self.d_model):.2f})"
            if has_dirs
            else f"{model} weights (no probe or knob direction at this layer's sites)"
        )
        fig.update_layout(
            title=f"Layer {self.layer}: {what}",
            height=720 if has_dirs else 420,
            legend={"title": {"text": "matrix"}, "orientation": "h", "y": -0.12},
            margin={"b": 80},
        )
        return fig


def _labels(names: Any) -> list[str]:
    """Short row labels, or the full names where two directions would share a short one."""
    full = list(dict.fromkeys(names))
    short = {n: _short(n) for n in full}
    unique = len(set(short.values())) == len(full)
    return [short[n] if unique else n for n in names]


def _short(name: str) -> str:
    """``probes/resid_mid:logistic-probe:task:tuned@resid_mid.1`` -> ``probes: tuned@resid_mid.1``."""
    if ":" not in name:
        return name
    head, tail = name.split(":", 1)[0], name.rsplit(":", 1)[-1]
    return f"{head.split('/')[0]}: {tail}"


def compute_atlas(
    pair: Any,
    cfg: AtlasConfig,
    *,
    directions: Sequence[Direction] = (),
    results: Iterable[tuple[str, Result]] = (),
    cache: AtlasCache | None = None,
) -> AtlasResult:
    """The atlas of ``cfg.layer`` for ``pair``: geometry against ``directions`` plus those found in
    ``results`` (name, Result), and each result's rows at the layer (by its declared layer column).

    ``cache``: decompositions and frames kept from earlier calls (an :class:`AtlasCache`); without one, a
    fresh one for this call. Results computed on another pair raise :class:`PairIncompatibleError`.
    """
    import pandas as pd

    dims = pair.dims
    if cfg.layer >= dims.n_layers:
        raise ConfigError(
            f"layer {cfg.layer} is outside the pair's {dims.n_layers} layers (0..{dims.n_layers - 1})"
        )
    cache = AtlasCache() if cache is None else cache
    hashes = pair.hashes()
    dirs = list(directions)
    findings: dict[str, Any] = {}
    for name, result in results:
        prov = getattr(result, "pair", None)
        known = isinstance(prov, dict) and prov.get("base") and prov.get("tuned")
        if known and (prov["base"], prov["tuned"]) != (hashes["base"], hashes["tuned"]):
            raise PairIncompatibleError(
                f"result {name!r} was computed on pair {prov.get('name')!r} (base {prov['base']}, tuned "
                f"{prov['tuned']}), but the atlas is for pair {pair.name!r} (base {hashes['base']}, "
                f"tuned {hashes['tuned']}); use the results folder of this pair"
            )
        dirs += directions_in(result, prefix=f"{name}:")
        dirs += [
            d
            for d in layer_directions(result, (cfg.layer, cfg.layer + 1), prefix=f"{name}:")
            if d.site.layer == cfg.layer or d.site.kind == "resid_pre"  # the next layer's only via resid_pre
        ]
        try:
            rows = result_rows_at_layer(result, cfg.layer, cache)
        except (NotImplementedError, TunelensError, ValueError, KeyError) as exc:
            log.warning("atlas: %s.to_frame() failed: %s", name, exc)
            rows = None
        if rows is not None and len(rows):
            findings[name] = rows
    with one_thread():
        geometry, spectra, skipped = _geometry(pair, cfg, dirs, hashes, cache)
    columns = ["matrix", "side", "model", "direction", "direction_site", "direction_model", "index", "sigma",
               "cos", "abs_cos", "captured_topk"]  # fmt: skip
    return AtlasResult(
        layer=cfg.layer,
        k=cfg.k,
        d_model=dims.d_model,
        pair=pair_provenance(pair),
        geometry=pd.DataFrame(geometry, columns=columns),
        spectra=pd.DataFrame(spectra, columns=["matrix", "side", "model", "index", "sigma"]),
        findings=findings,
        skipped=skipped,
    )


def _digest(matrix: Tensor) -> str:
    """The matrix's content (shape, dtype and bytes): the key of its cached decomposition, so weights
    changed in place are never answered from the cache."""
    t = matrix.detach().contiguous().cpu()
    h = hashlib.blake2b(f"{tuple(t.shape)}{t.dtype}".encode(), digest_size=16)
    h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _geometry(pair: Any, cfg: AtlasConfig, dirs: list[Direction], hashes: dict[str, str], cache: AtlasCache):
    """Rows of cosines and singular values, and the directions no matrix of the layer meets."""
    role_of = {h: r for r, h in hashes.items()}
    geometry, spectra, skipped, used = [], [], [], set()
    have = pair.base.family.matrix_kinds  # a plain MLP (GPT-2, GPT-NeoX) has no gate
    for comp in COMPARISONS:
        if comp.kind not in cfg.kinds or comp.kind not in have:
            continue
        here = [d for d in dirs if _matches(comp, d.site, cfg.layer)]
        mats = {r: residual_matrix(m, cfg.layer, comp.kind) for r, m in pair}
        mats["delta"] = mats["tuned"] - mats["base"]
        mname = str(MatrixName(cfg.layer, comp.kind))  # type: ignore[arg-type]
        for role, mat in mats.items():
            vecs, sigma = cache.top_singular(mat, cfg.k, side=comp.side)
            for i, s in enumerate(sigma.tolist(), start=1):
                spectra.append({"matrix": mname, "side": comp.side, "model": role, "index": i, "sigma": s})
            if sigma.numel() == 0 or float(sigma[0]) <= 1e-12:
                continue  # the matrix is zero (e.g. an untouched matrix's delta): no directions to compare
            for d in here:
                d.check_width(vecs.shape[0], f"residual-space singular vectors of {mname}")
                cos = (d.vector @ vecs).tolist()
                captured = float((d.vector @ vecs).pow(2).sum())
                used.add(d.name)
                for i, c in enumerate(cos, start=1):
                    geometry.append({
                        "matrix": mname, "side": comp.side, "model": role, "direction": d.name,
                        "direction_site": str(d.site), "direction_model": role_of.get(d.model, "?"),
                        "index": i, "sigma": float(sigma[i - 1]), "cos": c, "abs_cos": abs(c),
                        "captured_topk": captured,
                    })  # fmt: skip
    for d in dirs:
        if d.name not in used:
            skipped.append(
                f"{d.name} at {d.site}: no residual-space singular vectors of layer {cfg.layer} are read or "
                "written at that site"
            )
    return geometry, spectra, skipped


def atlas_from_folder(
    pair: Any, cfg: AtlasConfig, results_dir: str | os.PathLike[str], *, cache: AtlasCache | None = None
) -> AtlasResult:
    """:func:`compute_atlas` with every result saved in ``results_dir`` but atlases and results of types
    no analysis claims (each entry's declared analysis, :attr:`Entry.analysis
    <tunelens.faces.catalog.Entry.analysis>`).

    Results of another pair (the demo folder holds the knob of its own pair) are left out and named in
    ``skipped``. ``cache``: as for :func:`compute_atlas`; it also keeps the loaded results.
    """
    from tunelens.faces.catalog import pair_mismatches, scan

    cache = AtlasCache() if cache is None else cache
    loaded, notes = [], []
    hashes = pair.hashes()
    for entry in scan(results_dir):
        if entry.analysis in ("atlas", "other"):
            continue
        other = pair_mismatches([entry], hashes)
        if other:
            notes.append(f"{other[0]}; left out")
            continue
        try:
            loaded.append((entry.name, cache.load(entry.path, entry.mtime)))
        except StoreError as exc:
            notes.append(f"{entry.name} cannot be read ({exc}); left out")
    result = compute_atlas(pair, cfg, results=loaded, cache=cache)
    return dataclasses.replace(result, skipped=[*notes, *result.skipped])


def default_path(results_dir: str | os.PathLike[str], layer: int) -> Path:
    return Path(results_dir) / "atlas" / f"layer{layer:02d}"
