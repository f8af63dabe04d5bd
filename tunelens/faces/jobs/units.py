"""Units of work: what a job is split into, and the functions that run each kind of unit.

A :class:`Unit` is plain data (an id, a kind, JSON parameters, the units it waits for, the paths it
writes), so any executor can ship it to another process. :func:`execute` runs one unit in whatever
process it lands in: it fixes the seed and the torch thread count first, so a unit gives the same numbers
in-process, in a process pool and on Ray. Each kind writes its outputs atomically under the job folder:

``cache``   activations of the task on both models into an ActivationStore (resumes by shard), plus
            ``data.json`` (items, labels, classes, the pair's provenance)
``probe``   one probe kind on one site kind at every cached layer, for one seed -> a ProbeResult folder
``zoo``     build a zoo model (skipped if built) and write its record
``study``   a study of :mod:`tunelens.faces.registry` at full size, named by its key

Adding a kind is a function ``run(unit, root) -> dict`` and one entry in :data:`KINDS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import probes
from tunelens.errors import JobError, TunelensError
from tunelens.faces.jobs import faults
from tunelens.io import atomic_write_json

log = logging.getLogger(__name__)

DATA_FILE = "data.json"


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One unit of a job: ``kind`` run with ``params``; writes ``outputs`` (relative to the job folder)."""

    id: str
    kind: str
    params: dict[str, Any]
    outputs: tuple[str, ...]
    after: tuple[str, ...] = ()
    seed: int = 0
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(**{**d, "outputs": tuple(d["outputs"]), "after": tuple(d.get("after", ()))})

    def params_hash(self) -> str:
        text = json.dumps({"kind": self.kind, "params": self.params, "seed": self.seed}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class Task:
    """What an executor ships to a worker: the unit, where the job lives, and how to run it."""

    root: str
    unit: dict[str, Any]
    attempt: int = 1
    threads: int = 1
    faults: dict[str, Any] = field(default_factory=dict)


def execute(task: Task) -> dict[str, Any]:
    """Run one unit in this process (any executor's worker); returns its summary (JSON values)."""
    import torch

    unit = Unit.from_dict(task.unit)
    root = Path(task.root)
    plan = faults.FaultPlan(**task.faults) if task.faults else faults.FaultPlan()
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    with faults.injecting(plan):
        torch.set_num_threads(task.threads)
        torch.manual_seed(unit.seed)
        try:
            faults.maybe_fail(unit.id, task.attempt)
            faults.checkpoint(f"unit:start:{unit.id}")
            if unit.kind not in KINDS:
                raise JobError(f"unit {unit.id}: unknown unit kind {unit.kind!r}; known: {', '.join(KINDS)}")
            for rel in unit.outputs:  # a fresh job folder has none of the units' subfolders yet
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
            summary = KINDS[unit.kind](unit, root)
        finally:
            torch.set_num_threads(threads)
    return {"summary": summary, "seconds": round(time.perf_counter() - t0, 3)}


# --- cache --------------------------------------------------------------------------------------------


def load_pair_ref(ref: str | dict[str, str]):
    from tunelens.models.resolve import load_pair

    if isinstance(ref, str):
        return load_pair(ref)
    return load_pair(ref["base"], ref["tuned"])


def task_dataset(task: dict[str, Any]):
    """The data set a job's ``task`` names (generated from its seed; the first ``n`` examples)."""
    if task["name"] == "entity_tracking":
        from tunelens.tasks import entity_tracking as et

        cfg = et.EntityTrackingConfig(
            n_boxes=task["n_boxes"], n_contexts=math.ceil(task["n"] / task["n_boxes"])
        )
        return et.generate(cfg, seed=task["seed"]).subset(range(task["n"]))
    raise JobError(f"unknown task {task['name']!r}; jobs know entity_tracking")


def task_labels(dataset, label: str) -> list:
    """The probe label of each example (see :data:`tunelens.faces.jobs.spec.LABELS`)."""
    if label == "answer":
        return [e.label for e in dataset]
    if label == "query_index":
        return [int(e.meta["query_index"]) for e in dataset]
    if label == "query_is_first":
        return [int(e.meta["query_index"] == 0) for e in dataset]
    raise JobError(f"unknown task label {label!r}; expected answer, query_index or query_is_first")


def run_cache(unit: Unit, root: Path) -> dict[str, Any]:
    from tunelens.cache import CacheConfig, cache_to_store
    from tunelens.errors import SiteError
    from tunelens.results import pair_provenance
    from tunelens.sites import Site

    p = unit.params
    pair = load_pair_ref(p["pair"])
    n_layers = pair.dims.n_layers
    layers = list(range(n_layers)) if p["layers"] == "all" else list(p["layers"])
    if bad := [x for x in layers if not 0 <= x < n_layers]:
        raise SiteError(f"job layers {bad} are out of range; this pair has layers 0..{n_layers - 1}")
    sites = tuple(Site(kind, layer).validate(pair.dims) for kind in p["sites"] for layer in layers)
    c = p["cache"]
    cfg = CacheConfig(
        sites=sites, positions=p["task"]["position"], batch_size=c["batch_size"], backend=c["backend"],
        dtype=c["dtype"],
    )  # fmt: skip
    dataset = task_dataset(p["task"])
    folder = root / p["store"]

    def progress(done: int, total: int) -> None:
        faults.checkpoint(f"unit:shard:{unit.id}:{done}/{total}")

    stores = cache_to_store(pair, dataset, cfg, folder, shard_size=c["shard_size"], progress=progress)
    labels = task_labels(dataset, p["task"].get("label", "answer"))
    classes = sorted({str(x) for x in labels if x is not None})
    data = {
        "task": p["task"],
        "dataset_hash": dataset.content_hash(),
        "items": [e.item_id for e in dataset],
        "labels": [None if x is None else classes.index(str(x)) for x in labels],
        "classes": classes,
        "layers": layers,
        "sites": p["sites"],
        "pair": pair_provenance(pair),
    }
    atomic_write_json(folder / DATA_FILE, data)
    return {"items": len(dataset), "sites": len(sites), "shards": sum(s.n_shards for s in stores.values())}


# --- probe --------------------------------------------------------------------------------------------


def probe_config(spec_or_params: Any, kind: str, seed: int, checker: Any = None):
    """The probes package's ProbeConfig for one unit; a bad field is a JobError naming it."""
    extra = dict(getattr(spec_or_params, "probe", None) or spec_or_params.get("config", {}))
    source = getattr(checker, "source", "job")
    for key, where in (("kind", "probes"), ("seed", "seeds")):
        if key in extra:
            raise JobError(f"{source}: probe.{key}: set it with the top-level '{where}' list, not in 'probe'")
    try:
        return probes.ProbeConfig(**{**extra, "kind": kind, "seed": seed})
    except TypeError as e:
        raise JobError(f"{source}: probe: {e}") from None
    except (ValueError, TunelensError) as e:
        raise JobError(f"{source}: probes/probe: {e}") from None


def resolved_probe_fields(spec, kind: str, seed: int) -> dict[str, Any]:
    """Every ProbeConfig field of a unit, defaults included (so a changed default redoes the unit)."""
    cfg = asdict(probe_config(spec, kind, seed))
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in ("kind", "seed")}))


def read_layers(store_folder: Path, kind: str, layers: list[int]) -> dict[str, Any]:
    """``{"base": [layer, batch, d], "tuned": ...}`` of one site kind from a job's two stores."""
    import torch

    from tunelens.store import ActivationStore

    keys = [f"{kind}.{layer}" for layer in layers]
    out = {}
    for role in ("base", "tuned"):
        acts = ActivationStore.open(store_folder / role).read(keys)
        out[role] = torch.stack([acts[k].float() for k in keys])
    return out


def run_probe(unit: Unit, root: Path) -> dict[str, Any]:
    import torch

    p = unit.params
    folder = root / p["store"]
    data_file = folder / DATA_FILE
    if not data_file.is_file():
        raise JobError(f"unit {unit.id}: {data_file} is missing; the cache unit must run first")
    data = json.loads(data_file.read_text())
    if p["site"] not in data["sites"]:
        raise JobError(f"unit {unit.id}: site kind {p['site']!r} was not cached; cached: {data['sites']}")
    acts = read_layers(folder, p["site"], data["layers"])
    labels = torch.tensor(data["labels"])
    cfg = probe_config(p, p["probe"], unit.seed)
    result = probes.fit_probes(
        acts,
        labels,
        data["items"],
        cfg,
        layers=data["layers"],
        pair=data["pair"],
        site_kind=p["site"],
        task=f"{data['task']['name']} ({data['task'].get('label', 'answer')})",
        class_names=data["classes"],
    )
    faults.checkpoint(f"unit:fitted:{unit.id}")
    result.save(root / p["result"])
    return result.summary()


# --- zoo and studies ----------------------------------------------------------------------------------


def run_zoo(unit: Unit, root: Path) -> dict[str, Any]:
    from tunelens.models import zoo

    name = unit.params["name"]
    record = zoo.build(name, progress=lambda msg: log.info("%s", msg))
    atomic_write_json(root / unit.outputs[0], record)
    return {k: record[k] for k in ("name", "kind", "gain", "verdict") if k in record}


def run_study(unit: Unit, root: Path) -> dict[str, Any]:
    from tunelens.faces.registry import study

    try:
        s = study(unit.params["study"])
    except TunelensError as e:
        raise JobError(f"unit {unit.id}: {e}") from None
    if (missing := s.missing_extra()) is not None:
        raise JobError(f"unit {unit.id}: study {s.key} cannot run here: {missing}")
    out = root / unit.outputs[0]
    progress = lambda msg: log.info("%s: %s", unit.id, msg)
    pair = load_pair_ref(unit.params["pair"]) if unit.params.get("pair") else None
    summary = s(pair, out, "full", progress=progress)
    atomic_write_json(out / "study.json", {"study": s.key, "summary": summary})
    return summary


KINDS: dict[str, Callable[[Unit, Path], dict[str, Any]]] = {
    "cache": run_cache,
    "probe": run_probe,
    "zoo": run_zoo,
    "study": run_study,
}


# --- planning -----------------------------------------------------------------------------------------


def plan_units(spec, *, prefix: str = "", after: tuple[str, ...] = ()) -> list[Unit]:
    """The units of a :class:`~tunelens.faces.jobs.spec.JobSpec`: one cache unit, then one probe unit per
    (probe kind, site kind, seed). ``prefix`` nests everything in a subfolder (``reproduce`` uses it)."""
    store = f"{prefix}{spec.cache.store}"
    cache_id = f"{prefix}cache"
    task = asdict(spec.task)
    layers = spec.layers if spec.layers == "all" else list(spec.layers)
    cache = Unit(
        id=cache_id,
        kind="cache",
        params={
            "pair": spec.pair if isinstance(spec.pair, str) else dict(spec.pair),
            "task": task,
            "sites": list(spec.sites),
            "layers": layers,
            "cache": {k: v for k, v in asdict(spec.cache).items() if k != "store"},
            "store": store,
        },
        outputs=(f"{store}/base", f"{store}/tuned", f"{store}/{DATA_FILE}"),
        after=after,
        seed=spec.task.seed,
        label=f"cache {', '.join(spec.sites)} ({spec.task.name}, n={spec.task.n})",
    )
    units = [cache]
    if spec.kind == "probe":
        for probe in spec.probes:
            for site in spec.sites:
                for seed in spec.seeds:
                    name = f"{probe}-{site}-seed{seed}"
                    result = f"{prefix}{spec.results}/{name}"
                    units.append(
                        Unit(
                            id=f"{prefix}probe-{name}",
                            kind="probe",
                            params={
                                "store": store,
                                "site": site,
                                "probe": probe,
                                "config": resolved_probe_fields(spec, probe, seed),
                                "result": result,
                            },
                            outputs=(result,),
                            after=(cache_id,),
                            seed=seed,
                            label=f"probe {probe} on {site}, seed {seed}",
                        )
                    )
    return units
