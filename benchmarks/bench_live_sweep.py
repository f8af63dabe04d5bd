"""Live sweep on SmolLM2: wall time against one plain HF forward of the same prompt (the machine is shared,
so the ratio is the portable number). Run: OMP_NUM_THREADS=1 python benchmarks/bench_live_sweep.py"""

from __future__ import annotations

import os
import time

import torch

from circuits.patching.live import live_sweep
from tunelens.models import zoo

PROMPT = "The apple is in Box F. The cup is in Box Q. The dog is in Box B. Box Q contains the"
COUNTER = "The apple is in Box F. The cup is in Box Q. The dog is in Box B. Box B contains the"


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = zoo.load(os.environ.get("TUNELENS_BENCH_MODEL", "smollm2"), build_missing=False)
    batch = model.encode([PROMPT])
    model.logits(batch)
    live_sweep(model, PROMPT, COUNTER, top_k=10)  # warm-up
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        model.logits(batch)
    fwd = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        result = live_sweep(model, PROMPT, COUNTER, top_k=10)
    live = (time.perf_counter() - t0) / reps
    print(f"tokens {batch.input_ids.shape[1]}, sites attributed {result.n_sites}, top-k 10")
    print(f"one HF forward {fwd * 1000:.0f} ms; live sweep {live * 1000:.0f} ms = {live / fwd:.1f} forwards")
    print(result.summary())


if __name__ == "__main__":
    main()
