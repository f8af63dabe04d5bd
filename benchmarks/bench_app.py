"""How fast the app answers (issue 8 performance): pages on saved results after the model's first load, and
the live parts on SmolLM2. Prints seconds and ratios against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_app.py [RESULTS_DIR] [--pair smollm2-et] [--repeats 3]
    .venv/bin/python benchmarks/bench_app.py RESULTS_DIR --only atlas [--atlas-before REV]

Baselines: a bare Streamlit script (title only) under the same AppTest harness, for the pages; a plain greedy
generation of the same length on the same model, for live steering; for the layer atlas,
tunelens/atlas.py (now tunelens/faces/atlas.py) as it was at git revision REV (default: before its
per-matrix cache), run on the same pair, folder and layers, with its numbers checked against the current
ones. The current atlas runs with one AtlasCache held across the calls, as the app's page holds one.
Target: ≤ 2 s per answer.
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
    from circuits.knob.steering import steer
    from tunelens.faces import catalog
    from tunelens.faces.atlas import directions_in
    from tunelens.models.resolve import load_pair
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


# tunelens/atlas.py (now tunelens/faces/atlas.py) before the SVD cache, the top-k eigensolver and the
# frame cache
ATLAS_BEFORE = "7b32184"


# modules the old revision imports that have moved since (it imports them inside its functions)
MOVED = {"tunelens.catalog": "tunelens.faces.catalog"}


def _module_at(rev: str, rel: str, name: str):
    """``rel`` as it was at git revision ``rev``, imported as module ``name`` (read-only git use); the
    modules it imports under their old names (:data:`MOVED`) are given to it under those names."""
    import importlib
    import importlib.util
    import subprocess

    for old, new in MOVED.items():
        if old not in sys.modules and importlib.util.find_spec(old) is None:
            sys.modules[old] = importlib.import_module(new)

    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _same_atlas(a, b) -> float:
    """Largest difference of |cos|, σ and captured fraction between two atlases (cos signs are arbitrary)."""
    keys = ["matrix", "model", "direction", "index"]
    g = a.geometry.merge(b.geometry, on=keys, suffixes=("_a", "_b"), validate="one_to_one")
    assert len(g) == len(a.geometry) == len(b.geometry), "the atlases compare different rows"
    sp = a.spectra.merge(b.spectra, on=["matrix", "model", "index"], suffixes=("_a", "_b"))
    assert len(sp) == len(a.spectra) == len(b.spectra), "the atlases hold different spectra"
    diffs = [(g[f"{c}_a"] - g[f"{c}_b"]).abs().max() for c in ("abs_cos", "captured_topk")] if len(g) else []
    rel = ((sp.sigma_a - sp.sigma_b).abs() / sp.sigma_b.abs().clip(lower=1e-12)).max()
    assert set(a.findings) == set(b.findings), "the atlases found rows in different results"
    return float(max([*diffs, rel]))


def bench_atlas(results: str, pair_name: str, layers: list[int], before_rev: str) -> None:
    """The layer atlas per layer (what the page computes when the slider moves), before vs now."""
    from tunelens.faces import atlas as after
    from tunelens.models.resolve import load_pair

    before = _module_at(before_rev, "tunelens/atlas.py", "atlas_before")
    cache = after.AtlasCache()  # held across the calls, as the app's page holds one
    pair = load_pair(pair_name)
    pair.hashes()  # the content hashes are part of the model's first load
    before.atlas_from_folder(pair, before.AtlasConfig(layer=0, k=8), results)  # warm imports and file cache
    print(f"layer atlas on {pair_name}, {results}: tunelens/atlas.py at {before_rev} vs now (k = 8)")
    print(f"{'layer':>5s} {'before s':>9s} {'now s':>7s} {'ratio':>6s}  max difference")
    ratios = []
    for layer in layers:
        t = time.perf_counter()
        old = before.atlas_from_folder(pair, before.AtlasConfig(layer=layer, k=8), results)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        new = after.atlas_from_folder(pair, after.AtlasConfig(layer=layer, k=8), results, cache=cache)
        t_new = time.perf_counter() - t
        ratios.append(t_old / t_new)
        print(f"{layer:5d} {t_old:9.2f} {t_new:7.2f} {t_old / t_new:6.2f}  {_same_atlas(old, new):.1e}")
    sizes = f"{len(new.geometry)} cosines, {len(new.spectra)} singular values, {len(new.findings)} findings"
    print(f"median speed-up on a layer visited first: x{statistics.median(ratios):.2f} ({sizes})")
    for label, cfg in (("same layer again", (layers[0], 8)), ("k = 4 on a visited layer", (layers[0], 4))):
        t = time.perf_counter()
        old = before.atlas_from_folder(pair, before.AtlasConfig(layer=cfg[0], k=cfg[1]), results)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        new = after.atlas_from_folder(pair, after.AtlasConfig(layer=cfg[0], k=cfg[1]), results, cache=cache)
        t_new = time.perf_counter() - t
        print(f"{label}: before {t_old:.2f} s, now {t_new:.2f} s (x{t_old / t_new:.1f}); "
              f"max difference {_same_atlas(old, new):.1e}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default=str(ROOT / "results" / "demo"))
    p.add_argument("--pair", default="smollm2-et")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["pages", "steering", "atlas"], action="append")
    p.add_argument("--atlas-before", default=ATLAS_BEFORE, help="git revision of the atlas baseline")
    p.add_argument("--atlas-layers", default="3,10,17,24", help="layers to time, comma-separated")
    args = p.parse_args()
    if not Path(args.results).is_dir():
        sys.exit(f"{args.results} does not exist; run `tunelens demo` first (or give a results folder)")
    only = set(args.only or ["pages", "steering", "atlas"])
    if "pages" in only:
        bench_pages(args.results, args.pair, args.repeats)
    if "steering" in only:
        bench_steering(args.results, args.pair, args.repeats)
    if "atlas" in only:
        layers = [int(x) for x in args.atlas_layers.split(",")]
        bench_atlas(args.results, args.pair, layers, args.atlas_before)


if __name__ == "__main__":
    main()
