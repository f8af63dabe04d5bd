"""Batch jobs: a YAML job file split into units, run locally, in a process pool or on Ray, resumable.

    from tunelens.faces.jobs import JobSpec, run_job, job_status

    spec = JobSpec.from_file("examples/probe-job.yaml")
    report = run_job(spec)                 # a rerun skips finished units; fresh=True starts over
    job_status(spec.output)["done"]

Modules: :mod:`~tunelens.faces.jobs.spec` (the job file), :mod:`~tunelens.faces.jobs.units` (the kinds of
unit and
how a job splits into them), :mod:`~tunelens.faces.jobs.executors` (local, process, ray),
:mod:`~tunelens.faces.jobs.runner` (records, resume, retries), :mod:`~tunelens.faces.jobs.reproduce` (the
full-size
studies as one job) and :mod:`~tunelens.faces.jobs.faults` (the fault-injection test hook).
"""

from __future__ import annotations

from collections.abc import Callable

from tunelens.faces.jobs.runner import JobEvent, JobPlan, JobReport, job_status, run_plan
from tunelens.faces.jobs.spec import JobSpec
from tunelens.faces.jobs.units import Unit, plan_units


def plan_job(spec: JobSpec) -> JobPlan:
    """The units of a job file's spec, in its output folder."""
    return JobPlan(
        root=spec.output,
        kind=spec.kind,
        identity=spec.identity(),
        identity_hash=spec.identity_hash(),
        units=tuple(plan_units(spec)),
        source=spec.source,
        strict=True,
    )


def run_job(
    spec: JobSpec, *, fresh: bool = False, progress: Callable[[JobEvent], None] | None = None
) -> JobReport:
    """Run (or resume) the job ``spec`` describes with its executor settings."""
    e = spec.executor
    return run_plan(
        plan_job(spec),
        executor=e.kind,
        workers=e.workers,
        retries=e.retries,
        threads=e.threads,
        address=e.address,
        fresh=fresh,
        progress=progress,
    )


__all__ = ["JobEvent", "JobPlan", "JobReport", "JobSpec", "Unit", "job_status", "plan_job", "run_job"]
