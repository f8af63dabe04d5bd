"""Job files: a YAML description of a batch job, validated into a frozen :class:`JobSpec`.

A job file names what to compute (``kind``), on which pair, task, sites and layers, with which probes and
seeds, where the results go (``output``) and how to run (``executor``)::

    kind: probe                     # probe (cache activations, then fit probes) or cache (activations only)
    output: ../results/probe-job    # relative to this file's folder (or absolute)
    pair: smollm2-et                # a zoo pair, or {base: REF, tuned: REF} (zoo model, HF folder, adapter)
    task: {name: entity_tracking, n: 300, seed: 0, n_boxes: 3, position: last, label: query_is_first}
    sites: [resid_post]             # site kinds, read at every layer in ``layers``
    layers: all                     # or a list of layer numbers
    probes: [logistic, diff_means]  # probe kinds (probe jobs)
    seeds: [0]                      # one probe unit per (probe kind, site kind, seed)
    probe: {}                       # further ProbeConfig fields, the same for every unit
    cache: {batch_size: 16, shard_size: 256, dtype: float32, backend: bridge, store: acts}
    executor: {kind: local, workers: 1, retries: 2, threads: 1, address: null}

Every key is checked: an unknown key or a bad value raises :class:`~tunelens.errors.JobError` naming the
file, the key, the value that arrived and what is allowed. Paths the job writes (``cache.store``,
``results``) are relative to ``output`` and cannot leave it. Files are read with ``yaml.safe_load`` only.

Example:
    >>> spec = JobSpec.from_dict({"kind": "cache", "output": "/tmp/job", "pair": "tiny",
    ...                           "task": {"name": "entity_tracking", "n": 6}, "sites": ["resid_post"]})
    >>> spec.layers, spec.executor.kind, len(spec.identity_hash())
    ('all', 'local', 16)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from tunelens.errors import JobError
from tunelens.sites import RESIDUAL_KINDS, SITE_KINDS

JOB_KINDS = ("probe", "cache")
EXECUTORS = ("local", "process", "ray")
TASKS = ("entity_tracking",)
# Probe labels of entity tracking: the answer object (multi-class), which box of the world was queried
# (n_boxes classes), or whether it was the first box (binary; what diff_means needs).
LABELS = ("answer", "query_index", "query_is_first")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("bridge", "nnsight")
PROBE_SITE_KINDS = RESIDUAL_KINDS  # probes read d_model vectors


class _Checker:
    """Validation helpers that name the file and the key in every message."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: Any) -> JobError:
        return JobError(f"{self.source}: {key}: expected {expected}, got {got!r}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"a mapping with keys {', '.join(allowed)}", value)
        for k in value:
            if k not in allowed:
                where = f"in {key}" if key != "job" else "at the top level"
                raise JobError(
                    f"{self.source}: unknown key {k!r} {where}; allowed keys: {', '.join(allowed)}"
                )
        for k in required:
            if k not in value:
                where = f"{key}.{k}" if key != "job" else k
                raise JobError(f"{self.source}: missing required key {where!r}")
        return dict(value)

    def int_(self, value: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:
            rng = (
                f" >= {lo}"
                if hi is None and lo is not None
                else (f" in {lo}..{hi}" if lo is not None else "")
            )
            raise self.fail(key, f"an integer{rng}", value)
        return value

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(key, f"one of {', '.join(allowed)}", value)
        return value

    def str_(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "a non-empty string", value)
        return value

    def list_(self, value: Any, key: str, one: str) -> list:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"a non-empty list of {one}", value)
        if len(set(map(str, value))) != len(value):
            raise self.fail(key, f"a list of distinct {one}", value)
        return value

    def inside(self, value: Any, key: str) -> str:
        """A relative path that stays inside the output folder."""
        text = self.str_(value, key)
        p = PurePosixPath(text.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or text.startswith("~") or any(":" in s for s in p.parts):
            raise self.fail(key, "a relative path inside the output folder (no '..', no absolute path)", text)
        if any(part.startswith(".") for part in p.parts):
            raise self.fail(key, "a path without hidden ('.'-prefixed) parts", text)
        return str(p)


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    name: Literal["entity_tracking"]
    n: int
    seed: int = 0
    n_boxes: int = 3
    position: str = "last"
    label: str = "answer"


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    batch_size: int = 16
    shard_size: int = 256
    dtype: str = "float32"
    backend: str = "bridge"
    store: str = "acts"


@dataclass(frozen=True, kw_only=True)
class ExecutorSpec:
    kind: Literal["local", "process", "ray"] = "local"
    workers: int = 1
    retries: int = 2
    threads: int = 1
    address: str | None = None


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A validated job file. ``output`` is absolute; ``identity_hash`` ignores output and executor."""

    kind: Literal["probe", "cache"]
    output: Path
    pair: str | Mapping[str, str]
    task: TaskSpec
    sites: tuple[str, ...]
    layers: str | tuple[int, ...] = "all"
    probes: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    probe: Mapping[str, Any] = field(default_factory=dict)
    cache: CacheSpec = field(default_factory=CacheSpec)
    results: str = "probes"
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    source: str = "<job>"

    # -- reading --------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> JobSpec:
        """Read and validate a YAML job file (``output`` is taken relative to the file's folder)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise JobError(f"job file {path} does not exist (expected a YAML file)")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise JobError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(data, source=path.name, base_dir=path.resolve().parent)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<job>", base_dir: Path | None = None) -> JobSpec:
        c = _Checker(source)
        top = (
            "kind", "output", "pair", "task", "sites", "layers", "probes", "seeds", "probe", "cache",
            "results", "executor",
        )  # fmt: skip
        d = c.mapping(data, "job", top, required=("kind", "output", "pair", "task", "sites"))
        kind = c.choice(d["kind"], "kind", JOB_KINDS)
        out = Path(c.str_(d["output"], "output")).expanduser()
        out = Path(os.path.normpath(out if out.is_absolute() else (base_dir or Path.cwd()) / out))
        pair = _pair(c, d["pair"])
        t = c.mapping(d["task"], "task", tuple(TaskSpec.__dataclass_fields__), required=("name", "n"))
        task = TaskSpec(
            name=c.choice(t["name"], "task.name", TASKS),  # type: ignore[arg-type]
            n=c.int_(t["n"], "task.n", 1),
            seed=c.int_(t.get("seed", 0), "task.seed", 0),
            n_boxes=c.int_(t.get("n_boxes", 3), "task.n_boxes", 2, 20),
            position=c.str_(t.get("position", "last"), "task.position"),
            label=c.choice(t.get("label", "answer"), "task.label", LABELS),
        )
        site_kinds = PROBE_SITE_KINDS if kind == "probe" else tuple(k for k in SITE_KINDS if k != "logits")
        sites = tuple(c.choice(s, "sites", site_kinds) for s in c.list_(d["sites"], "sites", "site kinds"))
        layers: str | tuple[int, ...] = d.get("layers", "all")
        if layers != "all":
            layers = tuple(
                c.int_(x, "layers", 0) for x in c.list_(layers, "layers", "layer numbers or 'all'")
            )
        probes: tuple[str, ...] = ()
        if kind == "probe":
            if "probes" not in d:
                raise JobError(f"{source}: missing required key 'probes' (probe kinds) for a probe job")
            probes = tuple(c.str_(p, "probes") for p in c.list_(d["probes"], "probes", "probe kinds"))
        elif "probes" in d or "probe" in d:
            raise JobError(f"{source}: 'probes'/'probe' only apply to kind: probe, got kind: {kind}")
        seeds = tuple(c.int_(s, "seeds", 0) for s in c.list_(d.get("seeds", [0]), "seeds", "integers"))
        probe = c.mapping(d.get("probe", {}), "probe", tuple(d.get("probe", {}) or ()))
        k = c.mapping(d.get("cache", {}), "cache", tuple(CacheSpec.__dataclass_fields__))
        cache = CacheSpec(
            batch_size=c.int_(k.get("batch_size", 16), "cache.batch_size", 1),
            shard_size=c.int_(k.get("shard_size", 256), "cache.shard_size", 1),
            dtype=c.choice(k.get("dtype", "float32"), "cache.dtype", CACHE_DTYPES),
            backend=c.choice(k.get("backend", "bridge"), "cache.backend", BACKENDS),
            store=c.inside(k.get("store", "acts"), "cache.store"),
        )
        results = c.inside(d.get("results", "probes"), "results")
        e = c.mapping(d.get("executor", {}), "executor", tuple(ExecutorSpec.__dataclass_fields__))
        address = e.get("address")
        executor = ExecutorSpec(
            kind=c.choice(e.get("kind", "local"), "executor.kind", EXECUTORS),  # type: ignore[arg-type]
            workers=c.int_(e.get("workers", 1), "executor.workers", 1, 256),
            retries=c.int_(e.get("retries", 2), "executor.retries", 0, 20),
            threads=c.int_(e.get("threads", 1), "executor.threads", 1, 256),
            address=None if address is None else c.str_(address, "executor.address"),
        )
        spec = cls(
            kind=kind,  # type: ignore[arg-type]
            output=out,
            pair=pair,
            task=task,
            sites=sites,
            layers=layers,
            probes=probes,
            seeds=seeds,
            probe=probe,
            cache=cache,
            results=results,
            executor=executor,
            source=source,
        )
        if kind == "probe":
            _check_probe_fields(spec, c)
        return spec

    # -- identity -------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What the results depend on (everything but the output folder and how the job is run)."""
        d = asdict(self)
        for k in ("output", "executor", "source"):
            d.pop(k)
        d["pair"] = self.pair if isinstance(self.pair, str) else dict(self.pair)
        return json.loads(json.dumps(d, default=list, sort_keys=True))

    def identity_hash(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_executor(self, **changes: Any) -> JobSpec:
        """The same job run differently (CLI flags override the file's ``executor``)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        c = _Checker("command line")
        if "kind" in changes:
            c.choice(changes["kind"], "--executor", EXECUTORS)
        if "workers" in changes:
            c.int_(changes["workers"], "--workers", 1, 256)
        if "retries" in changes:
            c.int_(changes["retries"], "--retries", 0, 20)
        return replace(self, executor=replace(self.executor, **changes))


def _pair(c: _Checker, value: Any) -> str | dict[str, str]:
    if isinstance(value, str):
        return c.str_(value, "pair")
    d = c.mapping(value, "pair", ("base", "tuned"), required=("base", "tuned"))
    return {"base": c.str_(d["base"], "pair.base"), "tuned": c.str_(d["tuned"], "pair.tuned")}


def _check_probe_fields(spec: JobSpec, c: _Checker) -> None:
    """Probe kinds and ProbeConfig fields are checked against the probes package itself."""
    from tunelens.faces.jobs.units import probe_config

    for kind in spec.probes:
        for seed in spec.seeds:
            probe_config(spec, kind, seed, c)
