"""Every executor gives the same results (each unit fixes its seed and threads); Ray stays on loopback.

The process-pool and Ray tests start worker processes that import torch and the backends (tens of
seconds on 2 cores), so they are marked ``slow``: CI runs them, the quick loop (``-m "not slow"``) skips.
"""

from __future__ import annotations

import socket

import pytest

from tunelens.errors import JobError
from tunelens.faces.jobs import JobSpec, run_job

from .conftest import assert_same_outputs, hidden_entries

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, pair_dirs):
    import yaml

    from .conftest import job_dict

    folder = tmp_path_factory.mktemp("local")
    (folder / "job.yaml").write_text(yaml.safe_dump(job_dict(pair_dirs)))
    spec = JobSpec.from_file(folder / "job.yaml")
    run_job(spec)
    return spec


def _same_job_elsewhere(spec: JobSpec, tmp_path, **executor) -> JobSpec:
    other = JobSpec.from_file(spec.output.parent / "job.yaml")
    from dataclasses import replace

    return replace(other, output=tmp_path / "out").with_executor(**executor)


@pytest.mark.slow
def test_process_pool_gives_the_same_results_as_local(local_run, tmp_path):
    spec = _same_job_elsewhere(local_run, tmp_path, kind="process", workers=2)
    report = run_job(spec)
    assert len(report.done) == 5
    worst = assert_same_outputs(local_run.output, spec.output, atol=1e-6)
    print(f"process pool vs local: max abs difference {worst:.2e}")
    assert hidden_entries(spec.output) == []


def _listeners(pids: set[int]) -> list[tuple[int, str, int, str]]:
    import psutil

    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
            if listening and c.laddr:
                found.append((pid, c.laddr.ip, c.laddr.port, "udp" if c.type == socket.SOCK_DGRAM else "tcp"))
    return found


@pytest.mark.slow
def test_ray_is_bound_to_loopback_and_gives_the_same_results_as_local(local_run, tmp_path):
    pytest.importorskip("ray")
    import psutil

    from tunelens.faces.jobs.executors import RayExecutor

    with RayExecutor(workers=2) as ex:
        print(f"local Ray started in {ex.startup_seconds:.1f} s")
        pids = {p.pid for p in psutil.Process().children(recursive=True)}
        found = _listeners(pids)
        assert len(found) >= 3, f"expected Ray's services to listen somewhere, found {found}"
        exposed = [f for f in found if f[1] not in LOOPBACK]
        assert exposed == [], f"Ray listens beyond loopback: {exposed}"
        spec = _same_job_elsewhere(local_run, tmp_path, kind="ray", workers=2)
        report = run_job(spec)  # runs on the Ray started above
    assert len(report.done) == 5
    worst = assert_same_outputs(local_run.output, spec.output, atol=1e-6)
    print(f"ray vs local: max abs difference {worst:.2e}")


def test_ray_missing_is_a_clear_error(monkeypatch, local_run, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    spec = _same_job_elsewhere(local_run, tmp_path, kind="ray")
    with pytest.raises(JobError, match=r"pip install 'tunelens\[ray\]'"):
        run_job(spec)


def test_importing_the_jobs_package_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, tunelens.faces.jobs, tunelens.faces.jobs.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
