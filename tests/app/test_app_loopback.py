"""`tunelens app` serves on the loopback interface only (issue 9: safe defaults).

The command is started as a user would start it; once the server answers, every listening socket of the
process tree is listed and must be bound to 127.0.0.1 (or its IPv6-mapped form).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

pytestmark = pytest.mark.app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners(root: psutil.Process) -> list[str]:
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_tunelens_app_listens_on_loopback_only(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelens.faces.cli", "app", str(tmp_path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "tunelens app exited before serving"
            assert time.time() < deadline, "tunelens app did not answer within 90 s"
            time.sleep(0.5)
        listeners = _listeners(psutil.Process(proc.pid))
        assert listeners, "no listening socket found"
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in listeners), listeners
    finally:  # the process may be gone already (it exited early): the assertion above must still show
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        except psutil.NoSuchProcess:
            pass
        proc.kill()
        proc.wait(10)
