"""``tunelens reproduce``: every full-size study as one resumable batch job, through the job runner.

The job is built from three lists, in order:

* :data:`ZOO` — the zoo models the studies stand on (a unit per model; a built model is skipped);
* :data:`PROBE_JOBS` — probe sweeps written as job files (dicts), nested in their own subfolder;
* the studies of :mod:`tunelens.faces.registry` with full settings — each analysis package exports its
  own (``STUDIES``), with the zoo pair it runs on (or none). **Adding a study is one entry in its
  package's ``STUDIES``.**

Each study, zoo model and probe unit is a unit of the job: a rerun skips what is finished, ``--fresh``
starts over, and ``--executor process|ray`` spreads units over workers. Results land in ``OUT/<name>/``,
where the app and the report find them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tunelens.errors import JobError
from tunelens.faces.jobs.runner import JobPlan
from tunelens.faces.jobs.spec import JobSpec
from tunelens.faces.jobs.units import Unit, plan_units
from tunelens.studies import EXTRAS

# Zoo models, each after its base. Gemma needs the optional extra 'gemma' and is left out without it.
ZOO: tuple[str, ...] = (
    "smollm2",
    "smollm2-et-lora-r1",
    "smollm2-et-lora-r8",
    "smollm2-et-lora-r64",
    "smollm2-et-full",
    "smollm2-knob-lora",
    "smollm2-mix-full",
    "gemma3-270m",
    "gemma3-et-lora",
)

# Probe sweeps at full size, as job files (each runs after the zoo models of its pair). The probes
# package's own studies (below) cover the LoRA pair; this sweep adds the full fine-tune for comparison.
PROBE_JOBS: dict[str, dict[str, Any]] = {
    "probes-entity-tracking-full-ft": {
        "kind": "probe",
        "pair": "smollm2-et-full",
        # 500 worlds x 3 queried boxes; a 0.3 test split by world keeps 450 test prompts (>= 100).
        "task": {"name": "entity_tracking", "n": 1500, "seed": 0, "n_boxes": 3, "label": "query_is_first"},
        "sites": ["resid_post"],
        "layers": "all",
        "probes": ["logistic", "diff_means"],
        "seeds": [0],
        "probe": {"n_seeds": 5},
        "cache": {"batch_size": 16, "shard_size": 256},
    },
}


def _zoo_units() -> list[Unit]:
    from tunelens.models import zoo

    have_gemma = importlib.util.find_spec(EXTRAS["gemma"]) is not None
    units = []
    for name in ZOO:
        if name.startswith("gemma") and not have_gemma:
            continue
        base = zoo.entry(name).base
        units.append(
            Unit(
                id=f"zoo-{name}",
                kind="zoo",
                params={"name": name},
                outputs=(f"zoo/{name}.json",),
                after=(f"zoo-{base}",) if base else (),
                label=f"zoo model {name}",
            )
        )
    return units


def reproduce_plan(root: str | Path, only: list[str] | None = None) -> JobPlan:
    """The full-size studies as one job in ``root``; ``only``: just these (ids or names) and their needs."""
    from tunelens.faces import registry  # imports every analysis package: only when a plan is made
    from tunelens.models import zoo

    root = Path(root).resolve()
    units = _zoo_units()
    zoo_ids = {u.params["name"]: u.id for u in units}
    for name, job in PROBE_JOBS.items():
        spec = JobSpec.from_dict({**job, "output": str(root)}, source=f"reproduce:{name}")
        needs = zoo.PAIRS[spec.pair] if isinstance(spec.pair, str) and spec.pair in zoo.PAIRS else ()
        after = tuple(zoo_ids[m] for m in needs if m in zoo_ids)
        units += plan_units(spec, prefix=f"{name}/", after=after)
    for s in registry.sized("full"):
        needs = (*(zoo.PAIRS[s.pair] if s.pair else ()), *s.models)
        if s.missing_extra() is not None:
            continue  # it needs an optional extra ('gemma') that is not installed
        units.append(
            Unit(
                id=f"study-{s.key}",
                kind="study",
                params={"study": s.key, "pair": s.pair},
                outputs=(s.key,),
                after=tuple(zoo_ids[m] for m in needs if m in zoo_ids),
                label=f"study {s.key}{f' on {s.pair}' if s.pair else ''}",
            )
        )
    if only:
        units = _select(units, only)
    return JobPlan(
        root=root,
        kind="reproduce",
        identity={"kind": "reproduce"},
        identity_hash="reproduce",
        units=tuple(units),
        source="tunelens reproduce",
        strict=False,
    )


def _select(units: list[Unit], only: list[str]) -> list[Unit]:
    """The units named in ``only`` (an id, or a name such as ``probes`` for ``study-probes``) and their
    dependencies, in plan order."""
    by_id = {u.id: u for u in units}
    names = {u.id: u.id for u in units}
    for u in units:
        for prefix in ("study-", "zoo-"):
            if u.id.startswith(prefix):
                names[u.id[len(prefix) :]] = u.id
        names.setdefault(u.id.split("/")[0], u.id)
    wanted: set[str] = set()
    for name in only:
        hits = [uid for uid in by_id if uid == name or uid.startswith(f"{name}/")] or (
            [names[name]] if name in names else []
        )
        if not hits:
            shown = sorted(k for k in names if "/" not in k)
            raise JobError(f"reproduce --only: no study or unit {name!r}; known: {', '.join(shown)}")
        wanted.update(hits)
    todo = list(wanted)
    while todo:
        for dep in by_id[todo.pop()].after:
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return [u for u in units if u.id in wanted]
