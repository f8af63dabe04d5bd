"""Results go to disk and back without pickling, atomically, and refuse foreign or broken folders."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from tunelens.directions import Direction
from tunelens.errors import StoreCorruptError, StoreError
from tunelens.results import Result, find_results, load_result, read_summary
from tunelens.sites import Site


@dataclass(frozen=True, kw_only=True)
class Inner:
    lr: float
    layers: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Toy(Result):
    title = "toy"
    curves: dict
    table: pd.DataFrame
    array: np.ndarray
    config: Inner
    direction: Direction
    sites: list
    note: str | None = None

    def summary(self):
        return {"best": float(self.curves["base"].max())}


def _toy() -> Toy:
    v = torch.tensor([3.0, 4.0])
    return Toy(
        curves={"base": torch.arange(4.0), "tuned": torch.ones(2, 3, dtype=torch.float16), "same": v},
        table=pd.DataFrame({"layer": [0, 1], "acc": [0.5, 0.75]}),
        array=np.arange(6, dtype=np.int64).reshape(2, 3),
        config=Inner(lr=0.1, layers=(0, 2)),
        direction=Direction(site=Site("resid_post", 1), vector=v, name="d"),
        sites=[Site("z", 0, 2), ("a", 1)],
    )


def test_roundtrip_keeps_every_field_type(tmp_path):
    toy = _toy()
    path = toy.save(tmp_path / "toy")
    back = Toy.load(path)
    assert torch.equal(back.curves["base"], toy.curves["base"])
    assert back.curves["tuned"].dtype == torch.float16
    pd.testing.assert_frame_equal(back.table, toy.table)
    np.testing.assert_array_equal(back.array, toy.array)
    assert back.config == toy.config and isinstance(back.config.layers, tuple)
    assert back.direction.site == Site("resid_post", 1)
    assert torch.allclose(back.direction.vector, torch.tensor([0.6, 0.8]))
    assert back.sites == [Site("z", 0, 2), ("a", 1)]
    assert read_summary(path)["summary"] == {"best": 3.0}
    assert "best" in back._repr_html_()


def test_save_replaces_atomically_and_leaves_nothing_behind(tmp_path, monkeypatch):
    path = _toy().save(tmp_path / "toy")
    before = (path / "result.json").read_text()

    import tunelens.results as results_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results_mod, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        _toy().save(path)
    assert (path / "result.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_refuses_foreign_types_and_broken_files(tmp_path):
    path = _toy().save(tmp_path / "toy")
    doc = json.loads((path / "result.json").read_text())
    doc["type"] = "os:system"
    (path / "result.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="not from a tunelens package"):
        load_result(path)
    with pytest.raises(StoreError, match=r"no result\.json"):
        load_result(tmp_path / "missing")
    path = _toy().save(tmp_path / "toy2")
    (path / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(StoreCorruptError, match=r"tensors\.safetensors"):
        Toy.load(path)
    (path / "result.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match="not valid JSON"):
        Toy.load(path)


def test_find_results_skips_hidden_folders(tmp_path):
    _toy().save(tmp_path / "a" / "toy")
    _toy().save(tmp_path / "b")
    os.makedirs(tmp_path / ".b.old")
    assert list(find_results(tmp_path)) == ["a/toy", "b"]
