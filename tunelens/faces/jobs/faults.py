"""Fault injection for batch jobs: a TEST HOOK, off unless its environment variables are set.

The runner calls :func:`checkpoint` at named points (a unit starts, a cache shard is written, a probe is
fitted, a unit is done), and while a hook is active every ``os.fsync`` and ``os.replace`` in the process
is a checkpoint too, so the hook also reaches the middle of every atomic write (temp file written but not
yet renamed) in the store, in :class:`~tunelens.results.Result` saves and in the job's own records.
Checkpoints are counted from 1 in the order the process reaches them.

Environment variables (read when a job starts; the runner hands them to its workers):

``TUNELENS_FAULT_KILL_AT=N``      the process SIGKILLs itself at checkpoint ``N`` (a crash, no cleanup)
``TUNELENS_FAULT_ENOSPC_AT=N``    checkpoint ``N`` raises ``OSError(ENOSPC)`` (a full disk)
``TUNELENS_FAULT_TRACE=FILE``     append every checkpoint's number and name to ``FILE``
``TUNELENS_FAULT_FAIL_UNIT=ID:K`` unit ``ID`` raises a ``RuntimeError`` on its first ``K`` attempts

Only the fault-injection tests set these. Nothing here runs, and nothing is patched, when none is set.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

KILL_ENV = "TUNELENS_FAULT_KILL_AT"
ENOSPC_ENV = "TUNELENS_FAULT_ENOSPC_AT"
TRACE_ENV = "TUNELENS_FAULT_TRACE"
FAIL_ENV = "TUNELENS_FAULT_FAIL_UNIT"


@dataclass(frozen=True, kw_only=True)
class FaultPlan:
    """What the test hook does in one process (all ``None``: nothing)."""

    kill_at: int | None = None
    enospc_at: int | None = None
    trace: str | None = None
    fail_unit: str | None = None
    fail_times: int = 0

    @classmethod
    def from_env(cls) -> FaultPlan:
        def number(name: str) -> int | None:
            text = os.environ.get(name, "").strip()
            return int(text) if text else None

        fail = os.environ.get(FAIL_ENV, "").strip()
        unit, _, times = fail.rpartition(":") if fail else ("", "", "0")
        return cls(
            kill_at=number(KILL_ENV),
            enospc_at=number(ENOSPC_ENV),
            trace=os.environ.get(TRACE_ENV) or None,
            fail_unit=unit or None,
            fail_times=int(times or 0),
        )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.kill_at, self.enospc_at, self.trace, self.fail_unit))

    def to_dict(self) -> dict:
        return asdict(self)


class _State:
    def __init__(self) -> None:
        self.plan = FaultPlan()
        self.count = 0
        self.lock = threading.Lock()


_STATE = _State()  # per process; only ever non-empty inside :func:`injecting`


def checkpoint(name: str) -> None:
    """A point where the test hook may kill the process or raise; a no-op when no hook is active."""
    plan = _STATE.plan
    if not plan.active:
        return
    with _STATE.lock:
        _STATE.count += 1
        n = _STATE.count
    if plan.trace:
        with open(plan.trace, "a") as f:
            f.write(f"{n}\t{os.getpid()}\t{name}\n")
            f.flush()
    if plan.kill_at == n:
        os.kill(os.getpid(), signal.SIGKILL)
    if plan.enospc_at == n:
        raise OSError(errno.ENOSPC, f"No space left on device (injected at checkpoint {n}: {name})")


def maybe_fail(unit_id: str, attempt: int) -> None:
    """Raise on the first ``K`` attempts of the unit named by ``TUNELENS_FAULT_FAIL_UNIT``."""
    plan = _STATE.plan
    if plan.fail_unit == unit_id and attempt <= plan.fail_times:
        raise RuntimeError(f"injected failure of unit {unit_id} (attempt {attempt}; test hook {FAIL_ENV})")


@contextmanager
def injecting(plan: FaultPlan) -> Iterator[None]:
    """Activate ``plan`` in this process (patching ``os.fsync``/``os.replace``); undone on exit."""
    if not plan.active or _STATE.plan.active:  # nothing to do, or already active (in-process units)
        yield
        return
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        checkpoint("fsync")
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        checkpoint(f"replace:{os.path.basename(os.fspath(dst))}")
        return real_replace(src, dst, *args, **kwargs)

    old_plan, old_count = _STATE.plan, _STATE.count
    _STATE.plan, _STATE.count = plan, 0
    os.fsync, os.replace = fsync, replace
    try:
        yield
    finally:
        os.fsync, os.replace = real_fsync, real_replace
        _STATE.plan, _STATE.count = old_plan, old_count
