"""The layer atlas's geometry against numpy, on tiny pairs with a planted direction."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import make_tiny
from tunelens.directions import Direction
from tunelens.errors import ConfigError, PairIncompatibleError
from tunelens.faces.atlas import (
    AtlasCache,
    AtlasConfig,
    AtlasResult,
    atlas_from_folder,
    compute_atlas,
    rows_at_layer,
)
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.models.tiny import TinyConfig, tiny_gemma
from tunelens.results import Result
from tunelens.sites import Site

LAYER = 1


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def planted(tiny_tok):
    """A pair whose only difference is a rank-1 write ``5·d·vᵀ`` into layer 1's o_proj."""
    base = make_tiny(tiny_tok, name="atlas-base")
    rng = np.random.default_rng(0)
    d = _unit(rng.normal(size=base.dims.d_model))
    v = _unit(rng.normal(size=base.dims.n_heads * base.dims.d_head))
    module = copy.deepcopy(base.module)
    with torch.no_grad():
        module.model.layers[LAYER].self_attn.o_proj.weight += torch.tensor(
            5.0 * np.outer(d, v), dtype=torch.float32
        )
    tuned = LoadedModel(module, tiny_tok, source=ModelSource(kind="memory", location="atlas-tuned"), name="t")
    return ModelPair(base, tuned, name="planted"), d


def _svd_left(w: np.ndarray, k: int):
    u, s, _ = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return u[:, :k], s[:k]


def test_planted_direction_is_the_top_write_direction_of_the_delta(planted):
    pair, d = planted
    noise = np.random.default_rng(1).normal(size=d.shape)
    probe = Direction(site=Site("resid_mid", LAYER), vector=torch.tensor(d + 0.01 * noise), name="probe")
    far = Direction(site=Site("resid_mid", LAYER), vector=torch.tensor(noise), name="random")
    res = compute_atlas(pair, AtlasConfig(layer=LAYER, k=4), directions=[probe, far])

    g = res.geometry
    top = g[(g.matrix == "L1.o") & (g.model == "delta") & (g.direction == "probe") & (g["index"] == 1)]
    assert top.abs_cos.iloc[0] > 0.99
    rnd = g[(g.matrix == "L1.o") & (g.model == "delta") & (g.direction == "random") & (g["index"] == 1)]
    assert rnd.abs_cos.iloc[0] < 0.5

    # every cosine against an independent numpy SVD, for base, tuned and delta
    w_base = pair.base.module.model.layers[LAYER].self_attn.o_proj.weight.detach().numpy()
    w_tuned = pair.tuned.module.model.layers[LAYER].self_attn.o_proj.weight.detach().numpy()
    for role, w in (("base", w_base), ("tuned", w_tuned), ("delta", w_tuned - w_base)):
        u, s = _svd_left(w, 4)
        nonzero = s > 1e-6 * s[0]  # the rank-1 delta has one defined singular vector; the rest are arbitrary
        u, s = u[:, nonzero], s[nonzero]
        for name, vec in (("probe", _unit(d + 0.01 * noise)), ("random", _unit(noise))):
            rows = g[(g.matrix == "L1.o") & (g.model == role) & (g.direction == name)].sort_values("index")
            np.testing.assert_allclose(rows.abs_cos, np.abs(vec @ u), atol=1e-4)
            np.testing.assert_allclose(rows.sigma, s, rtol=1e-4)
            np.testing.assert_allclose(rows.captured_topk.iloc[0], np.sum((vec @ u) ** 2), atol=1e-4)


def test_sites_decide_which_matrices_are_compared(planted):
    pair, d = planted
    dirs = [
        Direction(site=Site("resid_mid", LAYER), vector=torch.tensor(d), name="mid"),
        Direction(site=Site("resid_post", LAYER), vector=torch.tensor(d), name="post"),
        Direction(site=Site("resid_pre", LAYER + 1), vector=torch.tensor(d), name="next_pre"),
        Direction(site=Site("resid_pre", LAYER), vector=torch.tensor(d), name="pre"),
        Direction(site=Site("resid_post", 0), vector=torch.tensor(d), name="other_layer"),
    ]
    res = compute_atlas(pair, AtlasConfig(layer=LAYER, k=3), directions=dirs)
    g = res.geometry
    kinds = {name: set(g[g.direction == name].matrix) for name in ("mid", "post", "next_pre", "pre")}
    assert kinds["mid"] == {"L1.o", "L1.gate", "L1.up"}  # o writes there; gate/up read it (input side)
    assert kinds["post"] == {"L1.down"} and kinds["next_pre"] == {"L1.down"}
    assert kinds["pre"] == {"L1.q", "L1.k", "L1.v"}  # read side only, never their output side
    assert set(g[g.matrix.isin(["L1.q", "L1.k", "L1.v", "L1.gate", "L1.up"])].side) == {"read"}
    assert set(g[g.matrix.isin(["L1.o", "L1.down"])].side) == {"write"}
    assert "other_layer" not in set(g.direction) and any("other_layer" in s for s in res.skipped)
    # the delta of an untouched matrix is zero: nothing is compared against it
    assert g[(g.matrix == "L1.down") & (g.model == "delta")].empty


def test_read_side_folds_the_input_norm_gain(planted):
    pair, d = planted
    block = pair.base.module.model.layers[LAYER]
    with torch.no_grad():
        block.input_layernorm.weight.copy_(torch.linspace(0.5, 2.0, pair.dims.d_model))
    try:
        x = Direction(site=Site("resid_pre", LAYER), vector=torch.tensor(d), name="x")
        res = compute_atlas(pair, AtlasConfig(layer=LAYER, k=3, kinds=("q",)), directions=[x])
        w = (
            block.self_attn.q_proj.weight.detach().numpy()
            * block.input_layernorm.weight.detach().numpy()[None]
        )
        _, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        rows = res.geometry[(res.geometry.model == "base")].sort_values("index")
        np.testing.assert_allclose(rows.abs_cos, np.abs(vh[:3] @ d), atol=1e-4)
        np.testing.assert_allclose(rows.sigma, s[:3], rtol=1e-4)
    finally:
        with torch.no_grad():
            block.input_layernorm.weight.fill_(1.0)


def test_gemma_write_side_folds_the_post_norm_gain(tiny_tok):
    model = tiny_gemma(TinyConfig(n_layers=2), len(tiny_tok.get_vocab()), seed=0)
    norm = model.model.layers[0].post_attention_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 1.0, norm.weight.numel()))
    base = LoadedModel(model, tiny_tok, source=ModelSource(kind="memory", location="g"), name="g")
    tuned = LoadedModel(copy.deepcopy(model), tiny_tok, source=ModelSource(kind="memory", location="g2"))
    d = _unit(np.random.default_rng(2).normal(size=base.dims.d_model))
    x = Direction(site=Site("attn_out", 0), vector=torch.tensor(d), name="x")
    res = compute_atlas(ModelPair(base, tuned), AtlasConfig(layer=0, k=2, kinds=("o",)), directions=[x])
    w = model.model.layers[0].self_attn.o_proj.weight.detach().numpy()
    gain = 1.0 + norm.weight.detach().numpy()  # Gemma's RMSNorm scales by 1 + weight
    u, _ = _svd_left(gain[:, None] * w, 2)
    rows = res.geometry[res.geometry.model == "base"].sort_values("index")
    np.testing.assert_allclose(rows.abs_cos, np.abs(d @ u), atol=1e-4)


@dataclass(frozen=True, kw_only=True)
class _Found(Result):
    title: ClassVar[str] = "found"
    frame: pd.DataFrame
    knob: Direction
    pair: dict

    def to_frame(self):
        return self.frame


def test_findings_and_directions_come_from_results(planted, tmp_path):
    pair, d = planted
    frame = pd.DataFrame({"layer": [0, 1, 1], "accuracy": [0.5, 0.9, 0.8]})
    knob = Direction(site=Site("resid_mid", LAYER), vector=torch.tensor(d), name="knob")
    found = _Found(frame=frame, knob=knob, pair={"name": "planted", **pair.hashes()})
    res = compute_atlas(pair, AtlasConfig(layer=LAYER, k=2), results=[("probes/x", found)])
    assert res.findings["probes/x"].accuracy.tolist() == [0.9, 0.8]
    assert "probes/x:knob" in set(res.geometry.direction)
    assert res.geometry[res.geometry.direction == "probes/x:knob"].direction_model.iloc[0] == "?"

    other = _Found(frame=frame, knob=knob, pair={"name": "other", "base": "x", "tuned": "y"})
    with pytest.raises(PairIncompatibleError, match="computed on pair 'other'"):
        compute_atlas(pair, AtlasConfig(layer=LAYER), results=[("r", other)])

    # save / load round trip, a figure with axis titles, and the folder path
    back = AtlasResult.load(res.save(tmp_path / "atlas"))
    pd.testing.assert_frame_equal(back.geometry, res.geometry)
    fig = back.figure("delta")
    assert fig.layout.xaxis.title.text and fig.data
    assert atlas_from_folder(pair, AtlasConfig(layer=0, k=2), tmp_path).layer == 0


def test_rows_at_layer_reads_matrix_and_site_columns():
    f = pd.DataFrame({"matrix": ["L0.q", "L3.down", "L3.o"], "n": [1, 2, 3]})
    assert rows_at_layer(f, 3, "matrix").n.tolist() == [2, 3]
    f = pd.DataFrame({"site": ["resid_post.2", "z.2.1", "resid_post.4"], "n": [1, 2, 3]})
    assert rows_at_layer(f, 2, "site").n.tolist() == [1, 2]
    f = pd.DataFrame({"site": [Site("resid_mid", 2), Site("z", 0, head=1)], "n": [1, 2]})
    assert rows_at_layer(f, 0, "site").n.tolist() == [2]
    assert rows_at_layer(pd.DataFrame({"x": [1]}), 0) is None  # no "layer" column
    assert rows_at_layer(pd.DataFrame({"layer": [0]}), 0, None) is None  # no layer column declared


@dataclass(frozen=True, kw_only=True)
class _BySite(_Found):
    layer_column: ClassVar[str | None] = "site"


@dataclass(frozen=True, kw_only=True)
class _ByMatrix(_Found):
    layer_column: ClassVar[str | None] = "matrix"


@dataclass(frozen=True, kw_only=True)
class _NoLayers(_Found):
    layer_column: ClassVar[str | None] = None


def test_findings_follow_the_layer_column_each_result_declares(planted):
    """Each result's rows at the layer are read from the column its type declares, never guessed: a
    ``site`` or ``matrix`` column when declared, ``layer`` by default, none when it declares None (even if
    its frame has a column that looks like layers)."""
    pair, d = planted
    prov = {"name": "planted", **pair.hashes()}
    knob = Direction(site=Site("resid_mid", LAYER), vector=torch.tensor(d), name="knob")
    frame = pd.DataFrame(
        {
            "layer": [1, 0, 0],  # disagrees with the other columns on purpose
            "matrix": ["L0.q", "L1.down", "L1.o"],
            "site": ["resid_post.1", "z.1.2", "resid_mid.0"],
            "value": [10, 20, 30],
        }
    )
    results = [
        ("by-layer", _Found(frame=frame, knob=knob, pair=prov)),
        ("by-site", _BySite(frame=frame, knob=knob, pair=prov)),
        ("by-matrix", _ByMatrix(frame=frame, knob=knob, pair=prov)),
        ("none", _NoLayers(frame=frame, knob=knob, pair=prov)),
        ("no-such-column", _BySite(frame=frame.drop(columns="site"), knob=knob, pair=prov)),
    ]
    res = compute_atlas(pair, AtlasConfig(layer=LAYER, k=2), results=results)
    found = {name: rows.value.tolist() for name, rows in res.findings.items()}
    assert found == {"by-layer": [10], "by-site": [10, 20], "by-matrix": [20, 30]}


def test_bad_config_says_what_is_wrong(planted):
    pair, _ = planted
    with pytest.raises(ConfigError, match="outside the pair's"):
        compute_atlas(pair, AtlasConfig(layer=9))
    with pytest.raises(ConfigError, match="k must be"):
        AtlasConfig(layer=0, k=0)
    with pytest.raises(ConfigError, match="kinds"):
        AtlasConfig(layer=0, kinds=("lm_head",))


# -- doing less work gives the same numbers ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "side"),
    [((12, 30), "write"), ((30, 12), "write"), ((30, 12), "read"), ((12, 30), "read"), ((20, 20), "read")],
)
def test_top_singular_is_the_svd_whichever_gram_it_uses(shape, side):
    """Top-k of the smaller Gram matrix, mapped to the asked side when needed, against numpy's full SVD;
    signs fixed (largest entry positive); a rank-deficient matrix keeps only its defined vectors."""
    from tunelens.faces.atlas import top_singular

    rng = np.random.default_rng(sum(shape) + len(side))
    w = rng.normal(size=shape)
    u, s, vh = np.linalg.svd(w)
    for k in (1, 5, 12):
        vecs, sigma = top_singular(torch.tensor(w, dtype=torch.float32), k, side=side)
        ref = (u if side == "write" else vh.T)[:, : min(k, min(shape))]
        np.testing.assert_allclose(sigma.numpy(), s[: ref.shape[1]], rtol=1e-5)
        np.testing.assert_allclose(
            np.abs(ref.T @ vecs.numpy().astype(np.float64)), np.eye(ref.shape[1]), atol=1e-4
        )
        big = vecs.abs().argmax(dim=0)
        assert (vecs[big, torch.arange(vecs.shape[1])] > 0).all()
    low = rng.normal(size=(shape[0], 2)) @ rng.normal(size=(2, shape[1]))  # rank 2
    vecs, sigma = top_singular(torch.tensor(low, dtype=torch.float32), 6, side=side)
    assert sigma.numel() == 2 and vecs.shape[1] == 2


def test_cached_decompositions_give_identical_atlases(planted):
    """The atlas from a cold cache, from a warm one, after another k, and after the weights changed in place
    (the cache is keyed by the matrices' contents, so it never answers for other weights)."""
    pair, d = planted
    probe = Direction(site=Site("resid_mid", LAYER), vector=torch.tensor(d), name="probe")
    cfg = AtlasConfig(layer=LAYER, k=4)
    cache = AtlasCache()
    cold = compute_atlas(pair, cfg, directions=[probe], cache=cache)
    assert 0 < len(cache.svd) <= 3 * 7  # equal matrices (the zero deltas of the same shape) share one
    n_cold = len(cache.svd)
    compute_atlas(pair, AtlasConfig(layer=LAYER, k=8), directions=[probe], cache=cache)
    assert len(cache.svd) == n_cold, "k = 8 reuses the decompositions made for k = 4"
    warm = compute_atlas(pair, cfg, directions=[probe], cache=cache)
    pd.testing.assert_frame_equal(warm.geometry, cold.geometry, check_exact=True)
    pd.testing.assert_frame_equal(warm.spectra, cold.spectra, check_exact=True)
    uncached = compute_atlas(pair, cfg, directions=[probe])  # a private cache of its own
    pd.testing.assert_frame_equal(uncached.geometry, cold.geometry, check_exact=True)
    o_proj = pair.tuned.module.model.layers[LAYER].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight.mul_(2.0)
    try:
        doubled = compute_atlas(pair, cfg, directions=[probe], cache=cache).spectra
    finally:
        with torch.no_grad():
            o_proj.weight.div_(2.0)

    def tuned_o(spectra: pd.DataFrame) -> np.ndarray:
        return spectra[(spectra.matrix == "L1.o") & (spectra.model == "tuned")].sigma.to_numpy()

    np.testing.assert_allclose(tuned_o(doubled), 2 * tuned_o(cold.spectra), rtol=1e-5)


def test_caches_are_the_callers_and_bounded(planted, tmp_path):
    """Nothing is kept in the module between calls: a call without a cache leaves no state behind, and a
    cache the caller holds keeps loaded results (once per result.json) and decompositions within its
    limits."""
    import tunelens.faces.atlas as atlas_module

    pair, _ = planted
    held = {
        name: type(value).__name__
        for name, value in vars(atlas_module).items()
        if isinstance(value, AtlasCache | dict | list | set) and not name.startswith("__")
    }
    assert held == {}, f"module-level state in tunelens.faces.atlas: {held}"

    from spectral.spectra import SpectrumConfig, spectra

    spectra(pair.base, {"tuned": pair.tuned}, SpectrumConfig(kinds=("o", "q"))).save(tmp_path / "spectra")
    cache = AtlasCache(svd_size=4, results_size=1)
    first = atlas_from_folder(pair, AtlasConfig(layer=LAYER, k=2), tmp_path, cache=cache)
    again = atlas_from_folder(pair, AtlasConfig(layer=0, k=2), tmp_path, cache=cache)
    assert set(first.findings["spectra"].matrix) == {"L1.o", "L1.q"}
    assert set(again.findings["spectra"].matrix) == {"L0.o", "L0.q"}
    assert len(cache.loaded) == 1 and len(cache.svd) == 4
    ((path, mtime), loaded) = next(iter(cache.loaded.items()))
    assert cache.load(path, mtime) is loaded, "a result is loaded once per result.json"
    pd.testing.assert_frame_equal(
        first.geometry, atlas_from_folder(pair, AtlasConfig(layer=LAYER, k=2), tmp_path).geometry
    )
