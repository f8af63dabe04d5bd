"""ProbeResult on disk and in figures; every bad input is a clear TunelensError."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from probe_toys import make_toy

from probes import ProbeConfig, ProbeResult, fit_probes
from probes.data import acts_from_stores
from tunelens.errors import ConfigError, ShapeError, SiteError, StoreMismatchError
from tunelens.results import load_result
from tunelens.store import ActivationStore, StoreSpec


def test_save_load_roundtrip_and_views(tmp_path):
    x, y, items = make_toy(n=300)
    res = fit_probes(
        {"base": x, "tuned": x + 0.1},
        y,
        items,
        ProbeConfig(min_test_items=20, n_seeds=2),
        pair={"name": "toy", "base": "h0", "tuned": "h1"},
        task="toy",
        notes={"why": "test"},
    )
    back = load_result(res.save(tmp_path / "probe"))
    assert isinstance(back, ProbeResult) and back.config == res.config and back.layers == res.layers
    for k in res.scores:
        torch.testing.assert_close(back.scores[k], res.scores[k], equal_nan=True)
    torch.testing.assert_close(back.weight, res.weight)
    assert back.summary() == res.summary() and back.notes == {"why": "test"}
    assert back.to_frame().equals(res.to_frame())
    assert back.direction("tuned", 1).model == "h1"
    fig = back.figure()
    assert fig.layout.xaxis.title.text == "layer" and "accuracy" in fig.layout.yaxis.title.text
    names = {t.name for t in fig.data}
    assert {"base: task", "tuned: task", "base: control task (Hewitt–Liang)"} <= names
    assert {t.line.dash for t in fig.data if "control" in t.name} == {"dash"}
    assert len(back.figure("transfer").data) == 5 and len(back.figure("selectivity").data) == 2
    frame = res.to_frame()
    row = frame[(frame.model == "base") & (frame.measure == "task") & (frame.layer == 1)].iloc[0]
    assert row.value == pytest.approx(float(res.scores["task"][0, :, 1].mean()))


def test_bad_inputs_are_named():
    x, y, items = make_toy(n=300)
    cfg = ProbeConfig(min_test_items=20)
    with pytest.raises(ShapeError, match="length 299"):
        fit_probes({"base": x}, y[:-1], items, cfg)
    with pytest.raises(ConfigError, match="single class"):
        fit_probes({"base": x}, torch.zeros(300, dtype=torch.long), items, cfg)
    bad = x.clone()
    bad[2, 17, 3] = float("nan")
    with pytest.raises(ShapeError, match=r"NaN/Inf.*layer index 2, example 17"):
        fit_probes({"base": x, "tuned": bad}, y, items, cfg)
    bad[2, 17, 3] = float("inf")
    with pytest.raises(ShapeError, match="NaN/Inf"):
        fit_probes({"base": bad}, y, items, cfg)
    with pytest.raises(ShapeError, match="items has length"):
        fit_probes({"base": x}, y, items[:10], cfg)
    with pytest.raises(ConfigError, match="unknown role"):
        fit_probes({"chat": x}, y, items, cfg)
    with pytest.raises(ShapeError, match=r"\[layer, batch, d_model\]"):
        fit_probes({"base": x[0]}, y, items, cfg)
    with pytest.raises(ConfigError, match=r"test split has 90 examples.*at least 100"):
        fit_probes({"base": x}, y, items, ProbeConfig())
    with pytest.raises(ConfigError, match="test_fraction"):
        ProbeConfig(test_fraction=1.5)
    with pytest.raises(ConfigError, match="kind"):
        ProbeConfig(kind="svm")  # type: ignore[arg-type]


def _store(path, models, sites=("resid_post.0", "resid_post.1")):
    spec = StoreSpec(
        models=models,
        sources={},
        sites=sites,
        positions="last",
        dtype="float32",
        dataset_hash="ds",
        n_items=4,
        shard_size=4,
    )
    st = ActivationStore.create(path, spec)
    st.write_shard(0, {s: torch.randn(4, 3) for s in sites})


def test_store_reader_checks_site_and_pair(tmp_path):
    models = {"base": "aa", "tuned": "bb"}
    for role in ("base", "tuned"):
        _store(tmp_path / role, models)
    acts = acts_from_stores(tmp_path, "resid_post", [0, 1], pair=models)
    assert acts["base"].shape == (2, 4, 3)
    with pytest.raises(SiteError, match=r"resid_post.5.*not cached"):
        acts_from_stores(tmp_path, "resid_post", [5], pair=models)
    with pytest.raises(StoreMismatchError, match="made from models"):
        acts_from_stores(tmp_path, "resid_post", [0], pair={"base": "aa", "tuned": "zz"})


def test_import_probes_stays_light():
    code = "import sys, probes; probes.ProbeConfig; print('streamlit' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
