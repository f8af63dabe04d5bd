"""The job runner: run a plan of units on an executor, record each unit atomically, resume on a rerun.

A job folder holds the units' outputs plus ``job/manifest.json`` (what the job is: its spec and the hash of
it, its units and their outputs) and ``job/units/<unit>.json`` (one record per unit: done or failed,
attempts, seconds, summary). A unit counts as done when its record says so, its parameters are unchanged
and its outputs exist; its outputs are written before its record, each atomically, so a crash at any point
leaves at most one unit to redo and no partial file (temp files a killed writer left are removed at the
next start). A rerun skips done units; ``fresh=True`` first removes what the job wrote (only that).
A folder made by a different job spec is refused.

Failed units are retried up to ``retries`` times (a :class:`~tunelens.errors.TunelensError`, being a
deterministic user error, is not); units that depend on a failed unit are skipped; the job then raises
:class:`~tunelens.errors.JobError` listing them. A full disk stops the job at once with a clear error,
keeping every finished unit.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelens.errors import JobError, TunelensError
from tunelens.faces.jobs import faults
from tunelens.faces.jobs.executors import make_executor
from tunelens.faces.jobs.units import Task, Unit
from tunelens.io import TMP_SUFFIX, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "tunelens-job/1"
JOB_DIR = "job"
MANIFEST = "manifest.json"


@dataclass(frozen=True, kw_only=True)
class JobPlan:
    """Units to run in ``root``; ``identity`` is what the results depend on (checked on a rerun).

    ``strict`` (job files): a folder made from another identity is refused. Not strict (``reproduce``,
    whose list of studies grows between versions): only units whose parameters changed are redone.
    """

    root: Path
    kind: str
    identity: dict[str, Any]
    identity_hash: str
    units: tuple[Unit, ...]
    source: str = ""
    strict: bool = True

    def __post_init__(self) -> None:
        ids = [u.id for u in self.units]
        if len(set(ids)) != len(ids):
            raise JobError(f"job plan has duplicate unit ids: {sorted({i for i in ids if ids.count(i) > 1})}")
        for u in self.units:
            if missing := [a for a in u.after if a not in ids]:
                raise JobError(f"unit {u.id} waits for unknown units {missing}")


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """Progress: ``state`` is skip (done earlier), start, done, retry or failed."""

    state: str
    unit: Unit
    done: int
    total: int
    message: str = ""


@dataclass(kw_only=True)
class JobReport:
    root: Path
    total: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    seconds: float = 0.0
    executor: str = "local"
    executor_startup_s: float = 0.0

    def line(self) -> str:
        return (
            f"{len(self.done)} units run, {len(self.skipped)} already done, {len(self.failed)} failed, "
            f"{len(self.blocked)} skipped after a failure ({self.total} in all) in {self.seconds:.1f} s"
        )


# --- records ------------------------------------------------------------------------------------------


def job_dir(root: Path) -> Path:
    return Path(root) / JOB_DIR


def record_path(root: Path, unit_id: str) -> Path:
    return job_dir(root) / "units" / (unit_id.replace("/", "__") + ".json")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        log.warning("ignoring unreadable job record %s (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = job_dir(root) / MANIFEST
    if not path.exists():
        return None
    data = read_json(path)
    if data is None or data.get("format") != FORMAT:
        raise JobError(f"{path} is not a tunelens job manifest (format {FORMAT}); choose another folder")
    return data


def is_done(root: Path, unit: Unit) -> bool:
    rec = read_json(record_path(root, unit.id))
    return (
        rec is not None
        and rec.get("state") == "done"
        and rec.get("params_hash") == unit.params_hash()
        and all((root / o).exists() for o in unit.outputs)
    )


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise JobError(f"job manifest names {rel!r}, which is outside the job folder {root}; refusing it")
    return root / rel


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clean_stale(root: Path, unit: Unit) -> None:
    """Remove the temp files a killed writer of ``unit``'s outputs left behind (only those)."""
    for rel in unit.outputs:
        out = root / rel
        if out.parent.is_dir():
            for stale in [
                *out.parent.glob(f".{out.name}.*{TMP_SUFFIX}"),
                *out.parent.glob(f".{out.name}.old"),
            ]:
                log.info("removing stale temp %s", stale)
                _remove(stale)
        if out.is_dir():
            for stale in out.glob(f".*{TMP_SUFFIX}"):
                _remove(stale)


def _diff(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if (d := _diff(old.get(k), new.get(k), f"{where}.{k}" if where else k)) is not None:
                return d
        return None
    return None if old == new else f"{where}: {old!r} there, {new!r} now"


def _open_manifest(plan: JobPlan, fresh: bool) -> None:
    root = plan.root
    old = read_manifest(root)
    if old is not None and fresh:
        for rec in old.get("units", {}).values():
            for rel in rec.get("outputs", []):
                _remove(_inside(root, rel))
        _remove(job_dir(root))
        log.info("--fresh: removed the outputs of the earlier job in %s", root)
        old = None
    changed = old is not None and old.get("identity_hash") != plan.identity_hash
    if changed and (plan.strict or old.get("kind") != plan.kind):
        what = _diff(old.get("identity"), plan.identity) or "kind"
        raise JobError(
            f"{root} holds a different job (spec {old.get('identity_hash')} from {old.get('source')!r}; "
            f"this one is {plan.identity_hash} from {plan.source!r}; first difference: {what}). "
            "Use --fresh to start over in this folder, or choose another output folder."
        )
    units = dict(old.get("units", {})) if old else {}
    for u in plan.units:
        units[u.id] = {
            "kind": u.kind,
            "label": u.label,
            "outputs": list(u.outputs),
            "params_hash": u.params_hash(),
        }
    manifest = {
        "format": FORMAT,
        "kind": plan.kind,
        "source": plan.source,
        "identity": plan.identity,
        "identity_hash": plan.identity_hash,
        "units": units,
        "order": [u.id for u in plan.units],
        "created": old.get("created") if old else time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (job_dir(root) / "units").mkdir(parents=True, exist_ok=True)
    for stale in [*job_dir(root).glob(f".*{TMP_SUFFIX}"), *(job_dir(root) / "units").glob(f".*{TMP_SUFFIX}")]:
        stale.unlink(missing_ok=True)
    atomic_write_json(job_dir(root) / MANIFEST, manifest)


# --- running ------------------------------------------------------------------------------------------


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside an executor's wrapper (Ray wraps the cause)."""
    return getattr(exc, "cause", None) or exc


def _is_disk_full(exc: BaseException) -> bool:
    exc = _cause(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _message(exc: BaseException) -> str:
    exc = _cause(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def run_plan(
    plan: JobPlan,
    *,
    executor: str = "local",
    workers: int = 1,
    retries: int = 2,
    threads: int = 1,
    address: str | None = None,
    fresh: bool = False,
    progress: Callable[[JobEvent], None] | None = None,
) -> JobReport:
    """Run every unit of ``plan`` that is not done yet; returns what happened.

    Raises :class:`~tunelens.errors.JobError` if a unit failed after its retries (the other units'
    results are kept and recorded; a rerun retries only the failed ones) or the disk filled up.
    """
    try:
        return _run(plan, executor, workers, retries, threads, address, fresh, progress)
    except OSError as e:
        if not _is_disk_full(e):
            raise
        raise JobError(
            f"disk full while writing under {plan.root} ({_message(e)}); finished units are kept. "
            "Free some space and rerun the same command to continue."
        ) from None


def _run(plan, executor, workers, retries, threads, address, fresh, progress) -> JobReport:
    t0 = time.perf_counter()
    plan.root.mkdir(parents=True, exist_ok=True)
    fault_plan = faults.FaultPlan.from_env()
    report = JobReport(root=plan.root, total=len(plan.units), executor=executor)
    emit = progress or (lambda event: None)
    with faults.injecting(fault_plan):
        _open_manifest(plan, fresh)
        done: set[str] = set()
        for u in plan.units:
            if is_done(plan.root, u):
                done.add(u.id)
                report.skipped.append(u.id)
                emit(JobEvent(state="skip", unit=u, done=len(done), total=len(plan.units)))
        pending = [u for u in plan.units if u.id not in done]
        if not pending:
            report.seconds = time.perf_counter() - t0
            return report
        attempts: dict[str, int] = {}
        bad: set[str] = set()
        with make_executor(executor, workers, address) as ex:
            report.executor_startup_s = getattr(ex, "startup_seconds", 0.0)
            in_flight: dict[Future, Unit] = {}

            def submit(u: Unit) -> None:
                attempts[u.id] = attempts.get(u.id, 0) + 1
                if attempts[u.id] == 1:
                    _clean_stale(plan.root, u)
                    emit(JobEvent(state="start", unit=u, done=len(done), total=len(plan.units)))
                task = Task(
                    root=str(plan.root), unit=u.to_dict(), attempt=attempts[u.id], threads=threads,
                    faults=fault_plan.to_dict() if fault_plan.active else {},
                )  # fmt: skip
                in_flight[ex.submit(task)] = u

            while True:
                for u in list(pending):
                    if any(a in bad for a in u.after):
                        pending.remove(u)
                        bad.add(u.id)
                        report.blocked.append(u.id)
                for u in [u for u in pending if all(a in done for a in u.after)]:
                    if len(in_flight) >= ex.workers:
                        break
                    pending.remove(u)
                    submit(u)
                if not in_flight:
                    break
                finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in finished:
                    u = in_flight.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        out = fut.result()
                        atomic_write_json(
                            record_path(plan.root, u.id),
                            {
                                "state": "done", "unit": u.to_dict(), "params_hash": u.params_hash(),
                                "attempts": attempts[u.id], "seconds": out["seconds"],
                                "summary": out["summary"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            },
                        )  # fmt: skip
                        faults.checkpoint(f"unit:done:{u.id}")
                        done.add(u.id)
                        report.done.append(u.id)
                        emit(JobEvent(state="done", unit=u, done=len(done), total=len(plan.units)))
                        continue
                    if _is_disk_full(exc):
                        raise JobError(
                            f"disk full while unit {u.id} was writing under {plan.root} ({_message(exc)}); "
                            f"the {len(done)} finished units are kept. Free some space and rerun the same "
                            "command to continue."
                        ) from None
                    if isinstance(_cause(exc), BrokenProcessPool):
                        ex.restart()
                    retryable = not isinstance(_cause(exc), TunelensError)
                    if retryable and attempts[u.id] <= retries:
                        log.warning(
                            "unit %s failed (%s); retry %d/%d", u.id, _message(exc), attempts[u.id], retries
                        )
                        emit(JobEvent(state="retry", unit=u, done=len(done), total=len(plan.units),
                                      message=_message(exc)))  # fmt: skip
                        submit(u)
                        continue
                    bad.add(u.id)
                    report.failed[u.id] = _message(exc)
                    log.error("unit %s failed after %d attempts: %s", u.id, attempts[u.id], _message(exc))
                    atomic_write_json(
                        record_path(plan.root, u.id),
                        {
                            "state": "failed", "unit": u.to_dict(), "params_hash": u.params_hash(),
                            "attempts": attempts[u.id], "error": _message(exc),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        },
                    )  # fmt: skip
                    emit(JobEvent(state="failed", unit=u, done=len(done), total=len(plan.units),
                                  message=_message(exc)))  # fmt: skip
    report.seconds = time.perf_counter() - t0
    if report.failed:
        shown = "; ".join(f"{k}: {v}" for k, v in list(report.failed.items())[:5])
        more = (
            f" (and {len(report.blocked)} units that depend on them were skipped)" if report.blocked else ""
        )
        raise JobError(
            f"{len(report.failed)} of {report.total} units failed{more}: {shown}. Finished units are kept "
            f"in {plan.root}; rerun to retry the failed ones."
        )
    return report


# --- status -------------------------------------------------------------------------------------------


def job_status(root: str | Path) -> dict[str, Any]:
    """What a job folder holds: every unit as done, failed or pending (with attempts, time, error)."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise JobError(
            f"{root} holds no tunelens job (no {JOB_DIR}/{MANIFEST}); run `tunelens jobs run` first"
        )
    rows = []
    for uid in manifest.get("order", list(manifest["units"])):
        info = manifest["units"][uid]
        rec = read_json(record_path(root, uid)) or {}
        state = rec.get("state", "pending")
        if state == "done" and (
            rec.get("params_hash") != info["params_hash"]
            or not all((root / o).exists() for o in info["outputs"])
        ):
            state = "pending"
        rows.append(
            {
                "unit": uid,
                "label": info.get("label", ""),
                "state": state,
                "attempts": rec.get("attempts", 0),
                "seconds": rec.get("seconds"),
                "error": rec.get("error", ""),
            }
        )
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "pending", "failed")}
    return {
        "root": str(root),
        "kind": manifest["kind"],
        "spec_hash": manifest["identity_hash"],
        "source": manifest.get("source", ""),
        "units": rows,
        **counts,
    }
