"""ActivationStore: activations of a model pair on disk, as safetensors shards plus a JSON manifest.

A store is a folder holding ``manifest.json`` (the :class:`StoreSpec` that identifies the data, and one
record per written shard: file name, byte size, sha256, keys) and ``shard-00000.safetensors`` ... Items
``shard_range(i)`` live in shard ``i``. Every file is written atomically (temp file in the same folder,
fsync, ``os.replace``), so a crash leaves either the old file or the new one, never half of one; a shard
file is recorded in the manifest only after it is safely on disk, so a rerun resumes with the missing
shards. A store has one writer at a time; readers may be many.

Example:
    >>> import tempfile, torch
    >>> from tunelens.store import ActivationStore, StoreSpec
    >>> spec = StoreSpec(models={"base": "ab12", "tuned": "cd34"}, sources={}, sites=("resid_post.1",),
    ...                  positions="last", dtype="float16", dataset_hash="ds01", n_items=5, shard_size=2)
    >>> store = ActivationStore.create(tempfile.mkdtemp() + "/acts", spec)
    >>> for i in store.missing_shards():
    ...     store.write_shard(i, {"resid_post.1": torch.randn(len(store.shard_range(i)), 8)})
    >>> store.verify()
    >>> store.read()["resid_post.1"].shape, store.read()["resid_post.1"].dtype
    (torch.Size([5, 8]), torch.float16)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tunelens.errors import ConfigError, ShapeError, StoreCorruptError, StoreError, StoreMismatchError
from tunelens.io import TMP_SUFFIX as _TMP_SUFFIX
from tunelens.io import atomic_write, file_digest
from tunelens.sites import Site

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MANIFEST = "manifest.json"
FORMAT = "tunelens-activation-store/1"
# What identifies the data, in the order a mismatch is reported (sources and extra are informational).
IDENTITY_FIELDS = ("models", "sites", "positions", "dtype", "dataset_hash", "n_items", "shard_size")


@dataclass(frozen=True, kw_only=True)
class StoreSpec:
    """What a store holds: which models (role -> content hash), sites, positions, dtype and data set."""

    models: Mapping[str, str]
    sources: Mapping[str, str]
    sites: tuple[str, ...]
    positions: str
    dtype: str
    dataset_hash: str
    n_items: int
    shard_size: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str, got: Any) -> None:
            if not ok:
                raise ConfigError(f"StoreSpec.{what}, got {got!r}")

        ok = isinstance(self.models, Mapping) and bool(self.models)
        need(ok, "models must map role -> content hash", self.models)
        for role, digest in self.models.items():
            need(isinstance(digest, str) and bool(digest), f"models[{role!r}] must be a hash string", digest)
        need(isinstance(self.sources, Mapping), "sources must map role -> source", self.sources)
        need(not isinstance(self.sites, str) and bool(self.sites), "sites must be non-empty", self.sites)
        try:
            sites = tuple(str(Site.parse(str(s))) for s in self.sites)
        except ValueError as e:
            raise ConfigError(f"StoreSpec.sites: {e}") from None
        need(len(set(sites)) == len(sites), "sites must not repeat", sites)
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}", self.dtype)
        for name in ("positions", "dataset_hash"):
            value = getattr(self, name)
            need(isinstance(value, str) and bool(value), f"{name} must be a non-empty string", value)
        for name in ("n_items", "shard_size"):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            need(ok, f"{name} must be a positive integer", value)
        try:
            extra = json.loads(json.dumps(dict(self.extra)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"StoreSpec.extra must be JSON-serialisable: {e}") from None
        object.__setattr__(self, "models", {str(k): v for k, v in self.models.items()})
        object.__setattr__(self, "sources", {str(k): str(v) for k, v in self.sources.items()})
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "extra", extra)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sites": list(self.sites)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreSpec:
        names = {f.name for f in fields(cls)}
        if unknown := set(data) - names:
            raise ConfigError(f"StoreSpec: unknown fields {sorted(unknown)}; expected {sorted(names)}")
        try:
            return cls(**{**data, "sites": tuple(data.get("sites", ()))})
        except TypeError as e:
            raise ConfigError(f"StoreSpec: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StoreSpec:
        return cls.from_dict(json.loads(text))

    def first_difference(self, other: StoreSpec) -> tuple[str, Any, Any] | None:
        """The first identifying field where ``self`` and ``other`` differ, as (what, ours, theirs)."""
        if set(self.models) != set(other.models):
            return "model roles", sorted(self.models), sorted(other.models)
        for role in sorted(self.models):
            if self.models[role] != other.models[role]:
                return f"{role} model", self.models[role], other.models[role]
        for name in IDENTITY_FIELDS[1:]:
            ours, theirs = getattr(self, name), getattr(other, name)
            if (set(ours) != set(theirs)) if name == "sites" else (ours != theirs):
                return name, ours, theirs
        return None


class ActivationStore:
    """A folder of safetensors shards plus a manifest; build with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, spec: StoreSpec, shards: dict[int, dict[str, Any]]) -> None:
        self._path, self._spec, self._shards = path, spec, shards

    # --- opening ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], spec: StoreSpec, *, resume: bool = True) -> ActivationStore:
        """Make a new store at ``path``, or reopen the one there if it was made with the same spec."""
        path = Path(path)
        if (path / MANIFEST).exists():
            store = cls.open(path, expect=spec)
            if not resume:
                done = f"{len(store.complete_shards())}/{store.n_shards} shards"
                raise StoreMismatchError(f"store at {path} exists ({done}); pass resume=True to continue it")
            for stale in path.glob(f".*{_TMP_SUFFIX}"):  # left by a writer that was killed
                logger.info("removing stale temp file %s", stale)
                stale.unlink(missing_ok=True)
            logger.info("resuming store at %s: %d/%d shards done", path, len(store._shards), store.n_shards)
            return store
        if path.exists() and not path.is_dir():
            raise StoreError(f"cannot create a store at {path}: it is a file, not a folder")
        if path.is_dir() and any(not p.name.endswith(_TMP_SUFFIX) for p in path.iterdir()):
            raise StoreError(
                f"cannot create a store at {path}: the folder is not empty and has no {MANIFEST}; "
                "choose an empty or new folder"
            )
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, spec, {})
        store._write_manifest()
        logger.info("created store at %s (%d shards of %d items)", path, store.n_shards, spec.shard_size)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, expect: StoreSpec | None = None) -> ActivationStore:
        """Open an existing store for reading; with ``expect``, check it holds that data."""
        path = Path(path)
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise StoreCorruptError(f"no activation store at {path}: {manifest} is missing")
        try:
            data = json.loads(manifest.read_text())
            if data.get("format") != FORMAT:
                raise StoreCorruptError(f"{manifest}: format {data.get('format')!r}, expected {FORMAT!r}")
            spec = StoreSpec.from_dict(data["spec"])
            shards = {int(k): dict(v) for k, v in data["shards"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreCorruptError(f"{manifest} is unreadable or malformed: {e}") from None
        store = cls(path, spec, shards)
        if bad := [i for i, rec in shards.items() if not 0 <= i < store.n_shards or "sha256" not in rec]:
            raise StoreCorruptError(f"{manifest} has invalid shard records {bad}")
        if expect is not None and (diff := spec.first_difference(expect)):
            what, ours, theirs = diff
            made = "was made from" if "model" in what else "has"
            raise StoreMismatchError(
                f"store at {path} {made} {what} {ours!r} but you asked for {theirs!r}; "
                "open it with the spec it was made with, or write to a new folder"
            )
        return store

    # --- layout ----------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def spec(self) -> StoreSpec:
        return self._spec

    @property
    def n_shards(self) -> int:
        return -(-self._spec.n_items // self._spec.shard_size)

    def shard_range(self, i: int) -> range:
        """Item indices held by shard ``i``."""
        self._check_index(i)
        start = i * self._spec.shard_size
        return range(start, min(start + self._spec.shard_size, self._spec.n_items))

    def shard_path(self, i: int) -> Path:
        self._check_index(i)
        return self._path / f"shard-{i:05d}.safetensors"

    def complete_shards(self) -> set[int]:
        """Shards recorded in the manifest whose file exists."""
        return {i for i in self._shards if self.shard_path(i).exists()}

    def missing_shards(self) -> list[int]:
        done = self.complete_shards()
        return [i for i in range(self.n_shards) if i not in done]

    @property
    def is_complete(self) -> bool:
        return not self.missing_shards()

    # --- writing ---------------------------------------------------------------------------------------
    def write_shard(self, i: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write shard ``i`` atomically; spec sites are cast to the spec dtype, other keys kept as given."""
        dest, items = self.shard_path(i), self.shard_range(i)
        tensors = {str(k) if isinstance(k, Site) else k: t for k, t in tensors.items()}
        if missing := [s for s in self._spec.sites if s not in tensors]:
            raise StoreError(
                f"shard {i}: sites {missing} missing; every shard holds {list(self._spec.sites)}"
            )
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, t in tensors.items():
            if not isinstance(key, str) or not isinstance(t, torch.Tensor):
                raise ShapeError(
                    f"shard {i}: {key!r} must be a str key with a tensor, got {type(t).__name__}"
                )
            if t.ndim == 0 or t.shape[0] != len(items):
                got = "a scalar" if t.ndim == 0 else f"shape {tuple(t.shape)}"
                raise ShapeError(f"shard {i}, {key!r}: expected first dim {len(items)} ({items}), got {got}")
            dtype = DTYPES[self._spec.dtype] if key in self._spec.sites else t.dtype
            t = t.detach().to(device="cpu", dtype=dtype).contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.data_ptr() in seen:
                t = t.clone()  # safetensors refuses views and tensors sharing memory
            seen.add(t.data_ptr())
            out[key] = t
        record: dict[str, Any] = {"file": dest.name, "keys": sorted(out)}

        def write(tmp: Path) -> None:
            save_file(out, str(tmp), metadata={"items": f"{items.start}:{items.stop}"})
            record.update(bytes=tmp.stat().st_size, sha256=file_digest(tmp))

        def unrecord() -> None:  # overwriting: a crash between here and the new record leaves it "missing"
            if self._shards.pop(i, None) is not None:
                self._write_manifest()

        atomic_write(dest, write, before_replace=unrecord)
        self._shards[i] = record
        self._write_manifest()
        logger.debug("wrote %s (%d bytes)", dest, record["bytes"])

    def _write_manifest(self) -> None:
        shards = {str(k): v for k, v in self._shards.items()}
        text = json.dumps({"format": FORMAT, "spec": self._spec.to_dict(), "shards": shards}, indent=2)
        atomic_write(self._path / MANIFEST, lambda tmp: tmp.write_text(text))

    # --- checking and reading --------------------------------------------------------------------------
    def verify(self, i: int | None = None) -> None:
        """Check size and sha256 of shard ``i`` (or of every recorded shard) against the manifest."""
        for j in sorted(self._shards) if i is None else [i]:
            rec, file = self._record(j), self.shard_path(j)
            if not file.exists():
                raise StoreCorruptError(
                    f"shard file {file} is in the manifest but missing; rerun to rewrite it"
                )
            if (size := file.stat().st_size) != rec["bytes"]:
                raise StoreCorruptError(
                    f"shard file {file} has {size} bytes, the manifest says {rec['bytes']}"
                )
            if (digest := file_digest(file)) != rec["sha256"]:
                raise StoreCorruptError(
                    f"shard file {file}: sha256 {digest}, the manifest says {rec['sha256']}"
                )

    def read_shard(
        self, i: int, sites: Iterable[str | Site] | None = None, *, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """Load shard ``i`` (all keys, or just ``sites``); checks its sha256 first unless ``verify=False``."""
        rec = self._record(i)
        if verify:
            self.verify(i)
        keys = rec["keys"] if sites is None else [str(s) for s in sites]
        if unknown := [k for k in keys if k not in rec["keys"]]:
            raise StoreError(f"store at {self._path} has no {unknown}; it holds {rec['keys']}")
        try:
            with safe_open(str(self.shard_path(i)), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError) as e:
            raise StoreCorruptError(f"shard file {self.shard_path(i)} cannot be read: {e}") from e

    def iter_shards(
        self, sites: Iterable[str | Site] | None = None
    ) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
        """Yield ``(item range, tensors)`` one shard at a time, so memory stays bounded by one shard."""
        self._require_complete()
        keys = None if sites is None else [str(s) for s in sites]
        for i in range(self.n_shards):
            yield self.shard_range(i), self.read_shard(i, keys)

    def read(self, sites: Iterable[str | Site] | None = None) -> dict[str, torch.Tensor]:
        """Every item of every shard, concatenated along the first dim (needs a complete store)."""
        out: dict[str, torch.Tensor] = {}
        for items, shard in self.iter_shards(sites):
            for key, t in shard.items():
                if key not in out:
                    out[key] = torch.empty((self._spec.n_items, *t.shape[1:]), dtype=t.dtype)
                if out[key].shape[1:] != t.shape[1:] or out[key].dtype != t.dtype:
                    have, got = (tuple(out[key].shape[1:]), out[key].dtype), (tuple(t.shape[1:]), t.dtype)
                    raise ShapeError(
                        f"{key!r}: items {items} have {got}, earlier ones {have}; use iter_shards"
                    )
                out[key][items.start : items.stop] = t
        return out

    def _require_complete(self) -> None:
        if missing := self.missing_shards():
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise StoreError(f"store at {self._path} is incomplete: {len(missing)} shards missing ({shown})")

    def _record(self, i: int) -> dict[str, Any]:
        self._check_index(i)
        if i not in self._shards:
            raise StoreError(f"shard {i} of the store at {self._path} has not been written")
        return self._shards[i]

    def _check_index(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < self.n_shards:
            raise StoreError(f"shard index {i!r} out of range; this store has shards 0..{self.n_shards - 1}")

    def __repr__(self) -> str:
        return f"ActivationStore({str(self._path)!r}, {len(self._shards)}/{self.n_shards} shards)"
