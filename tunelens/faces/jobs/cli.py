"""The ``tunelens jobs`` and ``tunelens reproduce`` commands (registered by :mod:`tunelens.faces.cli`).

tunelens jobs run JOB.yaml [--executor local|process|ray] [--workers N] [--address ADDR] [--fresh]
tunelens jobs status FOLDER|JOB.yaml
tunelens reproduce [--out DIR] [--executor ...] [--workers N] [--address ADDR] [--fresh]
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXECUTORS = ("local", "process", "ray")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _executor_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default=default, help="where units run")
    p.add_argument("--workers", type=int, default=None, help="parallel units (process pool / Ray CPUs)")
    p.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: a local Ray on 127.0.0.1)"
    )
    p.add_argument("--retries", type=int, default=None, help="retries of a failed unit (default 2)")
    p.add_argument("--fresh", action="store_true", help="remove what this job wrote before and start over")


class _Bar:
    """A tqdm bar over units, opened at the first event (so an early error prints no empty bar)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, event) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total, unit="unit", desc="units")
        self.bar.total = event.total
        if event.state in ("skip", "done"):
            self.bar.n = event.done
        if event.state == "start":
            self.bar.set_postfix_str(event.unit.label or event.unit.id)
        elif event.state in ("retry", "failed"):
            self.bar.write(f"unit {event.unit.id} {event.state}: {event.message}")
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(plan_runner, what: str) -> int:
    bar = _Bar()
    try:
        report = plan_runner(bar)
    finally:
        bar.close()
    _say(f"{what}: {report.line()}")
    if report.executor_startup_s:
        _say(f"{report.executor} started in {report.executor_startup_s:.1f} s")
    _say(f"results in {report.root}")
    return 0


def cmd_jobs_run(args) -> int:
    from tunelens.faces.jobs import run_job
    from tunelens.faces.jobs.spec import JobSpec

    spec = JobSpec.from_file(args.job).with_executor(
        kind=args.executor, workers=args.workers, address=args.address, retries=args.retries
    )
    _say(
        f"job {args.job} ({spec.kind}, spec {spec.identity_hash()}) -> {spec.output} on {spec.executor.kind}"
    )
    return _run(lambda progress: run_job(spec, fresh=args.fresh, progress=progress), "job")


def cmd_jobs_status(args) -> int:
    from tunelens.faces.jobs import job_status
    from tunelens.faces.jobs.spec import JobSpec

    target = Path(args.target)
    root = JobSpec.from_file(target).output if target.is_file() else target
    st = job_status(root)
    _say(f"job in {st['root']} ({st['kind']}, spec {st['spec_hash']} from {st['source']})")
    for row in st["units"]:
        secs = f"{row['seconds']:.1f} s" if row["seconds"] is not None else ""
        err = f"  {row['error']}" if row["error"] else ""
        _say(f"  {row['state']:8s} {row['unit']:40s} {secs:>9s}  {row['label']}{err}")
    _say(f"{st['done']} done, {st['pending']} pending, {st['failed']} failed ({len(st['units'])} units)")
    return 0


def cmd_reproduce(args) -> int:
    from tunelens.faces.jobs.reproduce import reproduce_plan
    from tunelens.faces.jobs.runner import run_plan

    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    plan = reproduce_plan(args.out, only)
    _say(f"tunelens reproduce -> {plan.root} ({len(plan.units)} units on {args.executor})")
    return _run(
        lambda progress: run_plan(
            plan,
            executor=args.executor,
            workers=args.workers or 1,
            retries=2 if args.retries is None else args.retries,
            address=args.address,
            fresh=args.fresh,
            progress=progress,
        ),
        "reproduce",
    )


def add_commands(sub) -> None:
    """Register ``jobs run``, ``jobs status`` and ``reproduce`` on the ``tunelens`` subparsers."""
    jobs = sub.add_parser("jobs", help="run or inspect a batch job file").add_subparsers(
        dest="jobs_command", required=True
    )
    r = jobs.add_parser("run", help="run (or resume) a job file")
    r.add_argument("job", help="a YAML job file (see examples/)")
    _executor_flags(r, None)
    r.set_defaults(func=cmd_jobs_run)
    s = jobs.add_parser("status", help="units done / pending / failed of a job")
    s.add_argument("target", help="the job's output folder, or its job file")
    s.set_defaults(func=cmd_jobs_status)

    rep = sub.add_parser("reproduce", help="run the full-size studies as a resumable batch job")
    rep.add_argument("--out", default="results/reproduce", help="results folder (default results/reproduce)")
    rep.add_argument("--only", default=None, help="comma list of studies/units (and what they need)")
    _executor_flags(rep, "local")
    rep.set_defaults(func=cmd_reproduce)
