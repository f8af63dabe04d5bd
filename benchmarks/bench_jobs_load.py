"""Load: a batch job of N prompts into an ActivationStore on SmolLM2, with peak RSS bounded and reported.

Runs two cache jobs through the job runner (``tunelens.faces.jobs``, local executor, in this process) on the
zoo pair ``smollm2-et``: all 30 ``resid_post`` sites at the last position of N entity-tracking prompts
(default 10 000; ``--n`` to reduce), shard size 256, batch 32. A small job of ``--baseline`` prompts
(default 500) runs first, in the same process, as the baseline: memory is bounded if the big job's peak
RSS is close to the small job's (the store is written shard by shard; nothing grows with N). A thread
samples RSS every 0.5 s. Reported: peak RSS of each job, the growth from small to large job, RSS at each
quarter of the large job's shards, failed units (must be 0), store size and throughput. The job folders
are temporary and removed at the end.

    .venv/bin/python benchmarks/bench_jobs_load.py [--n 10000] [--baseline 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_store_stream import MB, RssSampler, rss

from tunelens.faces.jobs import JobSpec, run_job
from tunelens.store import ActivationStore


def job(n: int, out: Path) -> JobSpec:
    return JobSpec.from_dict(
        {
            "kind": "cache",
            "output": str(out),
            "pair": "smollm2-et",
            "task": {"name": "entity_tracking", "n": n, "seed": 0, "position": "last"},
            "sites": ["resid_post"],
            "layers": "all",
            "cache": {"batch_size": 32, "shard_size": 256, "dtype": "float32"},
        },
        source=f"bench-{n}",
    )


def measured(n: int, out: Path) -> dict:
    sampler = RssSampler(0.5)
    start = rss()
    sampler.start()
    t0 = time.perf_counter()
    spec = job(n, out)
    report = run_job(spec)
    seconds = time.perf_counter() - t0
    sampler.stop()
    stores = [ActivationStore.open(out / "acts" / role) for role in ("base", "tuned")]
    for s in stores:
        s.verify()
    size = sum(f.stat().st_size for s in stores for f in s.path.iterdir())
    return {
        "n": n,
        "start_mb": start / MB,
        "peak_mb": sampler.peak / MB,
        "samples": sampler.samples,
        "t0": t0,
        "seconds": seconds,
        "failed": len(report.failed),
        "complete": all(s.is_complete for s in stores),
        "store_mb": size / MB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="prompts in the large job (default 10000)")
    ap.add_argument("--baseline", type=int, default=500, help="prompts in the small baseline job")
    ap.add_argument("--keep", action="store_true", help="keep the job folders")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-load-"))
    try:
        small = measured(args.baseline, tmp / "small")
        big = measured(args.n, tmp / "big")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"threads: torch default, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for r in (small, big):
        print(
            f"{r['n']:>6} prompts: RSS at start {r['start_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB; "
            f"{r['seconds']:.0f} s ({2 * r['n'] / r['seconds']:.1f} prompt-forwards/s); "
            f"store {r['store_mb']:.0f} MB; "
            f"failed units: {r['failed']}; complete: {r['complete']}"
        )
    samples = big["samples"]
    if samples:
        quarter = [
            samples[min(len(samples) - 1, int(q * (len(samples) - 1)))][1] / MB for q in (0.25, 0.5, 0.75, 1)
        ]
        print("large job RSS at 25/50/75/100% of its run: " + ", ".join(f"{x:.0f} MB" for x in quarter))
    growth = big["peak_mb"] - small["peak_mb"]
    ratio = big["n"] / small["n"]
    print(
        f"peak RSS, {big['n']} vs {small['n']} prompts ({ratio:.0f}x the data): {big['peak_mb']:.0f} vs "
        f"{small['peak_mb']:.0f} MB (growth {growth:+.0f} MB, ratio {big['peak_mb'] / small['peak_mb']:.2f}x)"
    )


if __name__ == "__main__":
    main()
