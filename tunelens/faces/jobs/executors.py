"""Executors: where units run. All three take a :class:`~tunelens.faces.jobs.units.Task` and give back a
``concurrent.futures.Future`` of :func:`~tunelens.faces.jobs.units.execute`'s summary.

``local``    in this process, one unit at a time (the default; what tests and debugging want)
``process``  a pool of ``workers`` spawned Python processes on this machine
``ray``      Ray tasks: a local Ray started for the job (bound to 127.0.0.1, no dashboard, ``workers``
             CPUs) or, with ``address``, an existing cluster (which must have tunelens installed and see
             the job's output folder at the same path)

Ray is optional (``pip install 'tunelens[ray]'``) and imported only when asked for.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol

from tunelens.errors import JobError
from tunelens.faces.jobs.units import Task, execute

log = logging.getLogger(__name__)

RAY_PIN = "ray==2.60.0"


class Executor(Protocol):
    workers: int

    def __enter__(self) -> Executor: ...
    def __exit__(self, *exc: object) -> None: ...
    def submit(self, task: Task) -> Future: ...
    def restart(self) -> None: ...


class LocalExecutor:
    """Runs each unit in this process as it is submitted."""

    workers = 1

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, task: Task) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(execute(task))
        except Exception as e:  # handed to the runner, which records and retries it
            fut.set_exception(e)
        return fut

    def restart(self) -> None:
        return None


class ProcessExecutor:
    """A pool of spawned worker processes (spawn, not fork: torch's thread pools do not survive a fork)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> None:
        import multiprocessing

        self._pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
        )

    def __enter__(self) -> ProcessExecutor:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, task: Task) -> Future:
        assert self._pool is not None
        return self._pool.submit(execute, task)

    def restart(self) -> None:
        """After a worker died (the pool is broken): a fresh pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._start()


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise JobError(
            f"--executor ray needs Ray, which is not installed: pip install 'tunelens[ray]' (or {RAY_PIN})"
        ) from None
    return ray


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_local_ray(num_cpus: int) -> Any:
    """A local Ray whose every service listens on 127.0.0.1 only, with no dashboard; returns ``ray``.

    Ray listens on all interfaces and advertises the machine's address unless both the environment
    variable ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read when ``ray`` is *imported*) and
    ``_node_ip_address`` say loopback (environment.md, Ray pitfall 14). If ``ray`` was imported before
    the variable was set, its constant is set to the same effect for the life of this local Ray.
    """
    os.environ.update(LOOPBACK_ENV)
    ray = import_ray()
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    return ray


class RayExecutor:
    """Units as Ray tasks (one CPU each). Starts a local Ray unless ``address`` names a cluster."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        self.workers, self.address = workers, address
        self._started = False
        self._remote: Any = None
        self._saved: dict[str, str | None] | None = None
        self.startup_seconds = 0.0

    def __enter__(self) -> RayExecutor:
        t0 = time.perf_counter()
        if self.address:
            ray = import_ray()
            if not ray.is_initialized():
                try:
                    ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise JobError(f"cannot connect to the Ray cluster at {self.address!r}: {e}") from None
                self._started = True
        else:
            import sys

            ray = sys.modules.get("ray")
            if ray is None or not ray.is_initialized():
                self._saved = {k: os.environ.get(k) for k in LOOPBACK_ENV}
                ray = start_local_ray(self.workers)
                self._started = True
        self.startup_seconds = time.perf_counter() - t0
        log.info("ray ready in %.1f s", self.startup_seconds)
        ray = import_ray()
        self._remote = ray.remote(num_cpus=1, max_retries=0)(execute)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._started:
            return
        ray = import_ray()
        ray.shutdown()
        self._started = False
        if self._saved is not None:  # a local Ray: give the process back its Ray settings
            from ray._private import ray_constants

            for k, v in self._saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", not ray_constants.IS_WINDOWS_OR_OSX
            )

    def submit(self, task: Task) -> Future:
        return self._remote.remote(task).future()

    def restart(self) -> None:
        return None


def make_executor(kind: str, workers: int = 1, address: str | None = None) -> Executor:
    if kind == "local":
        return LocalExecutor()
    if kind == "process":
        return ProcessExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise JobError(f"executor must be one of local, process, ray; got {kind!r}")
