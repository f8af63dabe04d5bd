"""Drive headless Chromium over the DevTools protocol (environment.md §7, pitfall 12): no extra packages.

Chromium is the Debian package (``apt-get install -y chromium``, done by scripts/setup.sh); websocket-client
talks to it. Used by the real-browser test and by benchmarks/load_app.py.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
INSTALL_HINT = "install it with `apt-get install -y chromium` (scripts/setup.sh does this on Debian/Ubuntu)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str | None:
    env = os.environ.get("TUNELENS_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


@contextlib.contextmanager
def streamlit_app(
    results: Path | str, pair: tuple[str, str] | None = None, port: int | None = None
) -> Iterator[str]:
    """``tunelens app`` 's server on a free loopback port; yields its base URL; stopped by PID."""
    port = port or free_port()
    env = {**os.environ, "TUNELENS_RESULTS": str(results), "PYTHONPATH": str(ROOT)}
    if pair:
        env["TUNELENS_APP_PAIR"] = "|".join(pair)
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
         "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", 60, proc)
        yield f"http://127.0.0.1:{port}"
    except BaseException:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace")[-4000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class Browser:
    """One headless Chromium with one tab, driven over CDP."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        import websocket

        exe = chromium_path()
        if exe is None:
            raise RuntimeError(f"no Chromium found ({', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}")
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="tunelens-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{self.port}/json/version", 30, self.proc)
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json") as r:
                tabs = [t for t in json.load(r) if t.get("type") == "page"]
            self.ws = websocket.create_connection(
                tabs[0]["webSocketDebuggerUrl"], suppress_origin=True, timeout=60
            )
        except BaseException:
            self.close()
            raise
        self._ids = itertools.count(1)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params):
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 60) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            if self.eval(expression):
                return True
            time.sleep(0.25)
        return False

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


# JavaScript probes of a Streamlit page
IDLE = (
    "!!document.querySelector('h1') && !document.querySelector('[data-testid=\"stStatusWidget\"] "
    "[data-testid=\"stStatusWidgetRunningIcon\"]') && !document.querySelector('.stSpinner')"
)
PLOTS = "document.querySelectorAll('.js-plotly-plot .main-svg').length"
ERRORS = (
    'Array.from(document.querySelectorAll(\'[data-testid="stAlertContentError"], '
    '[data-testid="stException"]\')).map(e => e.innerText)'
)
TITLE = "(document.querySelector('h1') || {}).innerText"
