"""Load check (issue 9 item 5): the app serving 5 concurrent browser sessions on loopback without errors.

    .venv/bin/python benchmarks/load_app.py [RESULTS_DIR] [--sessions 5] [--rounds 2] [--pair smollm2-et]

Starts the app's server on a free 127.0.0.1 port. Baseline: one headless Chromium walks every page once.
Load: ``--sessions`` Chromiums at once, each walking every page ``--rounds`` times (a bounded loop that
stops by itself). A page counts when its title is drawn, its scripts have finished and it shows no error
box. Prints the latency medians, their ratio (loaded / single session) and every failure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.app import browser as b  # noqa: E402

PAGES = [("", "Pair"), ("probes", "Probes"), ("patching", "Patching & CMAP"), ("circuit", "Circuit"),
         ("knob", "Context knob"), ("skills", "Skill localization"), ("intruders", "Intruder dimensions"),
         ("atlas", "Layer atlas"), ("jobs", "Jobs")]  # fmt: skip


def walk(url: str, rounds: int, times: list[float], failures: list[str], who: str) -> None:
    browser = b.Browser(width=1200, height=800)
    try:
        for r in range(rounds):
            for path, title in PAGES:
                t = time.perf_counter()
                browser.open(f"{url}/{path}")
                ok = browser.wait_for(f"{b.TITLE} === {title!r}", 180) and browser.wait_for(b.IDLE, 180)
                dt = time.perf_counter() - t
                errors = browser.eval(b.ERRORS) if ok else ["timed out"]
                if errors:
                    failures.append(f"{who} round {r} {path or 'pair'}: {errors}")
                times.append(dt)
    except Exception as exc:  # reported below, the loop ends
        failures.append(f"{who}: {type(exc).__name__}: {exc}")
    finally:
        browser.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default=str(ROOT / "results" / "demo"))
    p.add_argument("--sessions", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pair", default="", help="zoo pair to preload (default: none, saved results only)")
    args = p.parse_args()
    if b.chromium_path() is None:
        sys.exit(f"needs Chromium; {b.INSTALL_HINT}")
    pair = (args.pair, "") if args.pair else None
    with b.streamlit_app(args.results, pair) as url:
        single: list[float] = []
        failures: list[str] = []
        walk(url, 1, single, failures, "single")
        times: list[float] = []
        threads = [
            threading.Thread(target=walk, args=(url, args.rounds, times, failures, f"session {i}"))
            for i in range(args.sessions)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    n = args.sessions * args.rounds * len(PAGES)
    print(f"single session: {len(single)} pages, median {statistics.median(single):.2f} s")
    print(
        f"{args.sessions} sessions x {args.rounds} rounds: {len(times)}/{n} pages in {wall:.0f} s, median "
        f"{statistics.median(times):.2f} s, max {max(times):.2f} s "
        f"(x{statistics.median(times) / statistics.median(single):.1f} the single-session median)"
    )
    print("failures:" if failures else "no errors")
    for f in failures:
        print("  " + f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
