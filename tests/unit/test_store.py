"""Tests of tunelens.store: round trip, resume, mismatch, corruption, atomic writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from tunelens.errors import ConfigError, ShapeError, StoreCorruptError, StoreError, StoreMismatchError
from tunelens.store import MANIFEST, ActivationStore, StoreSpec

SITES = ("resid_post.0", "z.1.2")


def make_spec(**overrides) -> StoreSpec:
    kw = dict(
        models={"base": "ab12" * 8, "tuned": "cd34" * 8},
        sources={"base": "zoo:tiny", "tuned": "zoo:tiny-lora"},
        sites=SITES,
        positions="last",
        dtype="float16",
        dataset_hash="ds99",
        n_items=10,
        shard_size=3,
    )
    kw.update(overrides)
    return StoreSpec(**kw)


def shard_tensors(store: ActivationStore, i: int, seed: int = 0) -> dict[str, torch.Tensor]:
    n = len(store.shard_range(i))
    g = torch.Generator().manual_seed(seed * 1000 + i)
    return {
        "resid_post.0": torch.randn(n, 8, generator=g),
        "z.1.2": torch.randn(n, 4, generator=g),
        "labels": torch.arange(n) + store.shard_range(i).start,
    }


def fill(store: ActivationStore, shards=None) -> None:
    for i in range(store.n_shards) if shards is None else shards:
        store.write_shard(i, shard_tensors(store, i))


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_spec_json_round_trip_and_validation():
    spec = make_spec(extra={"prompt_len": 12, "note": ["a", 1]})
    assert StoreSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError, match="dtype"):
        make_spec(dtype="int8")
    with pytest.raises(ConfigError, match="shard_size"):
        make_spec(shard_size=0)
    with pytest.raises(ConfigError, match="sites"):
        make_spec(sites=())
    with pytest.raises(ConfigError, match="extra"):
        make_spec(extra={"x": object()})


def test_round_trip_values_after_cast(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    assert store.n_shards == 4 and store.shard_range(3) == range(9, 10)
    fill(store)
    assert store.is_complete
    store.verify()
    data = ActivationStore.open(tmp_path / "acts", expect=make_spec()).read()
    for key in SITES:
        expected = torch.cat([shard_tensors(store, i)[key] for i in range(4)]).to(torch.float16)
        assert data[key].dtype == torch.float16 and torch.equal(data[key], expected)
    assert torch.equal(data["labels"], torch.arange(10))  # extra keys keep their dtype
    one = store.read_shard(1, ["z.1.2"])
    assert list(one) == ["z.1.2"] and torch.equal(one["z.1.2"], shard_tensors(store, 1)["z.1.2"].half())
    ranges = [items for items, _ in store.iter_shards(["resid_post.0"])]
    assert ranges == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]


def test_views_of_one_tensor_can_be_written(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec(dtype="float32", n_items=3))
    big = torch.randn(6, 8)
    store.write_shard(0, {"resid_post.0": big[:3], "z.1.2": big[3:], "extra": big[:3]})
    assert torch.equal(store.read()["z.1.2"], big[3:])


def test_resume_skips_complete_shards(tmp_path):
    spec = make_spec()
    store = ActivationStore.create(tmp_path / "acts", spec)
    fill(store, [0, 2])
    again = ActivationStore.create(tmp_path / "acts", spec, resume=True)
    assert again.complete_shards() == {0, 2}
    assert again.missing_shards() == [1, 3]
    assert not again.is_complete
    fill(again, again.missing_shards())
    assert ActivationStore.open(tmp_path / "acts").is_complete


def test_existing_store_without_resume_is_refused(tmp_path):
    ActivationStore.create(tmp_path / "acts", make_spec())
    with pytest.raises(StoreMismatchError, match="resume=True"):
        ActivationStore.create(tmp_path / "acts", make_spec(), resume=False)


def test_mismatched_model_hash_names_both_and_touches_nothing(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    fill(store, [0, 1])
    before = snapshot(tmp_path / "acts")
    other = make_spec(models={"base": "ff00" * 8, "tuned": "cd34" * 8})
    with pytest.raises(StoreMismatchError) as info:
        ActivationStore.create(tmp_path / "acts", other)
    assert "ab12" * 8 in str(info.value) and "ff00" * 8 in str(info.value) and "base" in str(info.value)
    with pytest.raises(StoreMismatchError, match="ff00"):
        ActivationStore.open(tmp_path / "acts", expect=other)
    assert snapshot(tmp_path / "acts") == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", "float32"), ("sites", ("resid_post.0",)), ("n_items", 11), ("positions", "all")],
)
def test_first_differing_field_is_named(tmp_path, field, value):
    ActivationStore.create(tmp_path / "acts", make_spec())
    with pytest.raises(StoreMismatchError, match=field):
        ActivationStore.create(tmp_path / "acts", make_spec(**{field: value}))


def test_sources_and_extra_do_not_identify_data(tmp_path):
    ActivationStore.create(tmp_path / "acts", make_spec())
    ActivationStore.create(tmp_path / "acts", make_spec(sources={"base": "elsewhere"}, extra={"k": 1}))


def test_nonempty_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "acts").mkdir()
    (tmp_path / "acts" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        ActivationStore.create(tmp_path / "acts", make_spec())
    assert snapshot(tmp_path / "acts") == {"notes.txt": b"mine"}


def test_truncated_shard_is_named(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    fill(store)
    file = store.shard_path(2)
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(StoreCorruptError, match=file.name):
        store.verify()
    with pytest.raises(StoreCorruptError, match=file.name):
        store.read_shard(2)
    store.verify(1)  # the other shards are fine


def test_flipped_byte_is_detected(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    fill(store)
    file = store.shard_path(1)
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="sha256"):
        store.verify(1)
    with pytest.raises(StoreCorruptError, match=file.name):
        ActivationStore.open(tmp_path / "acts").read()


def test_recorded_shard_missing_from_disk(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    fill(store)
    store.shard_path(0).unlink()
    with pytest.raises(StoreCorruptError, match="shard-00000"):
        store.verify()
    assert store.missing_shards() == [0]


def test_missing_manifest(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    (store.path / MANIFEST).unlink()
    with pytest.raises(StoreCorruptError, match="acts"):
        ActivationStore.open(tmp_path / "acts")


def test_wrong_first_dim(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    tensors = shard_tensors(store, 0)
    tensors["z.1.2"] = torch.randn(2, 4)
    with pytest.raises(ShapeError, match=r"z\.1\.2.*expected first dim 3.*\(2, 4\)"):
        store.write_shard(0, tensors)
    with pytest.raises(StoreError, match="missing"):
        store.write_shard(0, {"resid_post.0": torch.randn(3, 8)})


@pytest.mark.parametrize("where", ["replace", "write"])
def test_crash_during_write_keeps_old_state_and_no_temp_files(tmp_path, monkeypatch, where):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    fill(store, [0])
    before = snapshot(store.path)

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "replace":
        monkeypatch.setattr(os, "replace", boom)
    else:  # die half-way through writing the temp file

        def partial(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a shard")
            boom()

        monkeypatch.setattr("tunelens.store.save_file", partial)
    for i in (0, 1):  # overwrite a complete shard, and write a new one
        with pytest.raises(OSError) as info:
            store.write_shard(i, shard_tensors(store, i, seed=1))
        assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(store.path) == before
    reopened = ActivationStore.create(tmp_path / "acts", make_spec())
    assert reopened.complete_shards() == {0}
    reopened.verify()


def test_read_of_incomplete_store_names_missing(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    fill(store, [0, 2])
    with pytest.raises(StoreError, match=r"missing \(1, 3\)"):
        store.read()
    with pytest.raises(StoreError, match="1, 3"):
        next(store.iter_shards())


def test_unknown_site_lists_stored_keys(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    fill(store)
    with pytest.raises(StoreError, match=r"resid_post\.0") as info:
        store.read(["resid_post.7"])
    assert "resid_post.7" in str(info.value)
    with pytest.raises(StoreError, match="not been written"):
        ActivationStore.create(tmp_path / "other", make_spec()).read_shard(0)


def test_overwrite_updates_checksum_and_resume_clears_stale_temps(tmp_path):
    store = ActivationStore.create(tmp_path / "acts", make_spec())
    fill(store, [0])
    new = shard_tensors(store, 0, seed=7)
    store.write_shard(0, new)
    store.verify(0)
    assert torch.equal(store.read_shard(0)["z.1.2"], new["z.1.2"].half())
    (store.path / ".shard-00001.safetensors.abc.tmp").write_bytes(b"left by a killed writer")
    ActivationStore.create(tmp_path / "acts", make_spec())
    assert sorted(p.name for p in store.path.iterdir()) == [MANIFEST, "shard-00000.safetensors"]
