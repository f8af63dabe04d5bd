"""Memory and speed of streaming a pair's activations to an ActivationStore.

Streams N entity-tracking prompts (default 10 000; ``--quick`` 500) through both models of a SmolLM2
pair (base, and a copy with slightly perturbed weights) with ``tunelens.cache.cache_to_store``: all 30
``resid_post`` sites at the last position, shard size 256, batch size 32. A background thread samples
the process RSS every 0.5 s. Reported: peak RSS growth over the RSS right after the two models are
loaded and run once (the goal: < 500 MB, i.e. memory does not grow with N), that growth split into
the prompts, the backends' one-off cost and the streaming itself, the store's size on disk, and
throughput. The store is written to a temporary folder, removed at the end.

    .venv/bin/python benchmarks/bench_store_stream.py [--quick] [--n 10000] [--backend bridge]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import perturbed_pair, prompts

from tunelens.cache import CacheConfig, cache_to_store
from tunelens.sites import all_layers

GOAL_MB = 500
MB = 2**20


def rss() -> int:
    """Resident set size of this process in bytes (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("cannot read RSS: no psutil and no /proc/self/status") from None
    return psutil.Process().memory_info().rss


class RssSampler(threading.Thread):
    """Samples RSS every ``interval`` seconds until stopped; keeps the peak and every sample."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.samples = interval, rss(), []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            now = rss()
            self.peak = max(self.peak, now)
            self.samples.append((time.perf_counter(), now))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 prompts instead of 10 000")
    ap.add_argument("--n", type=int, default=None, help="number of prompts (default 10 000, quick 500)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--backend", choices=["bridge", "nnsight"], default="bridge")
    ap.add_argument("--interval", type=float, default=0.5, help="RSS sampling period in seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the store (its path is printed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n or (500 if args.quick else 10_000)

    pair = perturbed_pair()
    gc.collect()
    rss_raw = rss()
    # Weights load lazily from the safetensors mmap; one plain forward of each model makes them resident,
    # so the reference is "the pair loaded and usable", not "the files mapped".
    tokens = pair.base.encode(prompts(args.batch_size).prompts)
    for _, model in pair:
        model.logits(tokens)
    gc.collect()
    rss_loaded = rss()
    sampler = RssSampler(args.interval)
    sampler.start()
    sites = tuple(all_layers(pair.dims, "resid_post"))
    cfg = CacheConfig(sites=sites, positions="last", batch_size=args.batch_size, backend=args.backend)
    dataset = prompts(n)
    rss_data = rss()
    for _, model in pair:  # built by cache_to_store anyway; done here to tell fixed cost from streaming
        model.backend(args.backend)
    gc.collect()
    rss_backends = rss()

    folder = Path(tempfile.mkdtemp(prefix="tunelens-bench-store-"))
    n_shards = math.ceil(n / args.shard_size) * 2
    trace: list[tuple[int, float, int]] = []
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - t0
        trace.append((done, elapsed, rss()))
        if done == 1 or done == total or done % max(1, total // 10) == 0:
            eta = elapsed / done * (total - done)
            line = f"{elapsed:7.1f} s  RSS {trace[-1][2] / MB:6.0f} MB  ETA {eta:5.0f} s"
            print(f"  shard {done:>4}/{total} {line}", flush=True)

    try:
        print(f"streaming {n} prompts x 2 models into {folder} ({n_shards} shards) ...", flush=True)
        stores = cache_to_store(
            pair, dataset, cfg, folder / "acts", shard_size=args.shard_size, progress=progress
        )
        elapsed = time.perf_counter() - t0
        sampler.stop()
        disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if not all(s.is_complete for s in stores.values()):
            raise SystemExit(f"store incomplete: {stores}")
        first = stores["base"].read_shard(0)[str(sites[-1])]
    finally:
        if args.keep:
            print(f"store kept at {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    half = len(trace) // 2
    early = max((r for _, _, r in trace[:half]), default=0)
    late = max((r for _, _, r in trace[half:]), default=0)
    growth = (sampler.peak - rss_loaded) / MB
    print(f"\n{n} prompts x 2 models, {len(sites)} resid_post sites, last position, backend {args.backend},")
    print(
        f"batch {args.batch_size}, shard {args.shard_size}, {torch.get_num_threads()} threads, "
        f"load average at the end {os.getloadavg()[0]:.1f}\n"
    )
    rows = [
        ("RSS after zoo.load x2 (mmapped)", f"{rss_raw / MB:.0f} MB"),
        ("RSS after a forward of each (ref)", f"{rss_loaded / MB:.0f} MB"),
        ("RSS after building the backends", f"{rss_backends / MB:.0f} MB"),
        ("peak RSS", f"{sampler.peak / MB:.0f} MB ({len(sampler.samples)} samples)"),
        ("  growth over the loaded pair", f"{growth:.0f} MB"),
        ("  of which the prompts", f"{(rss_data - rss_loaded) / MB:.0f} MB"),
        ("  of which backends (one-off)", f"{(rss_backends - rss_data) / MB:.0f} MB"),
        ("  of which streaming", f"{(sampler.peak - rss_backends) / MB:.0f} MB"),
        ("max RSS, 1st / 2nd half of shards", f"{early / MB:.0f} / {late / MB:.0f} MB"),
        ("store on disk", f"{disk / MB:.1f} MB ({disk / (2 * n):.0f} B per prompt per model)"),
        ("shard 0 of base, last site", f"{tuple(first.shape)} {first.dtype}"),
        ("wall time", f"{elapsed:.1f} s"),
        ("throughput", f"{n / elapsed:.1f} prompts/s through the pair (both models)"),
        ("projected 10 000 prompts", f"{10_000 / (n / elapsed) / 60:.1f} min"),
    ]
    for label, value in rows:
        print(f"{label:<36}{value}")
    status = "ok" if growth < GOAL_MB else "MISSED"
    print(f"\nRATIO rss_growth_mb = {growth:.0f} (goal < {GOAL_MB} MB) {status}")


if __name__ == "__main__":
    main()
