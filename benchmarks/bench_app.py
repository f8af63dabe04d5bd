"""How fast the app answers (issue 8 performance): pages on saved results after the model's first load, and
the live parts on SmolLM2. Prints seconds and ratios against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_app.py [RESULTS_DIR] [--pair smollm2-et] [--repeats 3]

Baselines: a bare Streamlit script (title only) under the same AppTest harness, for the pages; a plain greedy
generation of the same length on the same model, for live steering. Target: ≤ 2 s per answer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGES = ["pair", "probes", "patching", "circuit", "knob", "skills", "intruders", "atlas", "jobs"]


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_pages(results: str, pair: str, repeats: int) -> None:
    from streamlit.testing.v1 import AppTest

    os.environ["TUNELENS_RESULTS"] = results
    os.environ["TUNELENS_APP_PAIR"] = pair if "|" in pair else f"{pair}|"  # "BASE|TUNED" or a zoo pair
    bare = Path(tempfile.mkdtemp()) / "bare.py"
    bare.write_text("import streamlit as st\nst.title('bare')\n")
    at0 = AppTest.from_file(str(bare), default_timeout=600).run()
    base_s = _timed(at0.run, repeats)
    print(f"baseline: bare Streamlit script rerun {base_s * 1000:.0f} ms")
    t = time.perf_counter()
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=600).run()
    print(f"first load of the app with pair {pair} (model load included): {time.perf_counter() - t:.1f} s")
    print(f"{'page':12s} {'first s':>8s} {'rerun s':>8s} {'x bare':>7s}  errors")
    for page in PAGES:
        if page != "pair":
            at.switch_page(f"pages/{page}.py")
        t = time.perf_counter()
        at.run()
        first = time.perf_counter() - t
        rerun = _timed(at.run, repeats)
        errs = [e.value[:60] for e in at.error] + [e.value[:60] for e in at.exception]
        flag = "OK " if rerun <= 2.0 else "SLOW"
        print(f"{page:12s} {first:8.2f} {rerun:8.2f} {rerun / base_s:7.1f}  {flag} {errs if errs else ''}")


def bench_steering(results: str, pair_name: str, repeats: int) -> None:
    from circuits.steering import steer
    from tunelens import catalog
    from tunelens.atlas import directions_in
    from tunelens.models.loading import load_pair
    from tunelens.results import load_result

    knobs = catalog.by_analysis(catalog.scan(results), "knob")
    if not knobs:
        print("live steering: no knob result in the folder; skipped")
        return
    knob = load_result(knobs[0].path)
    direction = directions_in(knob)[0]
    prov = knobs[0].pair.get("name") or pair_name
    pair = load_pair(prov) if prov else load_pair(pair_name)
    prompt = "Context: The capital of France is Rome. Question: What is the capital of France? Answer:"
    n = 6
    plain = _timed(lambda: pair.tuned.generate(prompt, max_new_tokens=n), repeats)
    steered = _timed(lambda: steer(pair.tuned, direction, prompt, 2.0, max_new_tokens=n), repeats)
    flag = "OK" if 2 * steered <= 2.0 else "SLOW"
    print(
        f"live steering on {prov}, {n} new tokens: plain generate {plain:.2f} s, steered {steered:.2f} s "
        f"(x{steered / plain:.2f}); the page runs base and tuned: {2 * steered:.2f} s  {flag}"
    )


def bench_attribution() -> None:
    try:
        from circuits import live_sweep  # noqa: F401
    except ImportError:
        print("live attribution sweep: circuits.live_sweep does not exist yet; not measured")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default=str(ROOT / "results" / "demo"))
    p.add_argument("--pair", default="smollm2-et")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not Path(args.results).is_dir():
        sys.exit(f"{args.results} does not exist; run `tunelens demo` first (or give a results folder)")
    bench_pages(args.results, args.pair, args.repeats)
    bench_steering(args.results, args.pair, args.repeats)
    bench_attribution()


if __name__ == "__main__":
    main()
