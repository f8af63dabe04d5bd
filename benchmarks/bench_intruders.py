"""Intruder analysis of every matrix of a SmolLM2 pair: spectral.intruders vs a plain per-matrix SVD loop.

Baseline: for each of the 210 matrices, ``torch.linalg.svd`` (thin, float32) of the base and of the tuned
matrix, then ``max |U_t[:, :k]ᵀ U_0|``, the straightforward implementation of spec §4.1.
Candidate: :func:`spectral.intruder_family` without baselines (batched exact base basis from the Gram
eigendecomposition, top-``k_max`` tuned vectors by converged subspace iteration), which also keeps 20 vectors
per matrix for the k-sweeps where the baseline keeps only what it computed.

Both run in the same process, interleaved, ``--repeats`` times; prints the median times, the paired ratio,
and how far the two answers are apart (max |Δ best match| over all top-k vectors; intruder counts).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_intruders.py [--pair smollm2-et] [--repeats 2]

Goal: candidate <= 30 s and >= 2x faster than the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectral.engine import read_stack, select_names
from spectral.intruders import IntruderConfig, intruder_family
from tunelens.models import zoo


def plain_loop(pair, names, k: int) -> torch.Tensor:
    out = []
    for name in names:
        w0 = read_stack(pair.base, [name])[0]
        wt = read_stack(pair.tuned, [name])[0]
        u0 = torch.linalg.svd(w0, full_matrices=False)[0]
        ut = torch.linalg.svd(wt, full_matrices=False)[0][:, :k]
        out.append((ut.T @ u0).abs().amax(-1))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="smollm2-et")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    pair = zoo.load_pair(args.pair)
    names = select_names(pair.dims.n_layers)
    cfg = IntruderConfig(k=args.k, baselines=())
    print(f"pair {args.pair}: {len(names)} matrices, k={args.k}, torch threads {torch.get_num_threads()}")
    plain, fast, cpu = [], [], {"plain": [], "fast": []}
    result = reference = None
    for r in range(args.repeats):
        order = ("plain", "fast") if r % 2 == 0 else ("fast", "plain")
        for which in order:
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "plain":
                reference = plain_loop(pair, names, args.k)
                plain.append(time.perf_counter() - t0)
            else:
                result = intruder_family(pair.base, {"tuned": pair.tuned}, cfg)
                fast.append(time.perf_counter() - t0)
            cpu[which].append(time.process_time() - c0)
        print(f"repeat {r + 1}: plain loop {plain[-1]:.1f} s, spectral {fast[-1]:.1f} s")
    ours = result.max_sim[0, :, : args.k]
    order = [result.matrices.index(str(n)) for n in names]
    diff = float((ours[order] - reference).abs().max())
    n_ref = int((reference < cfg.epsilon).sum())
    ratio = statistics.median(p / f for p, f in zip(plain, fast, strict=True))
    print(f"median: plain loop {statistics.median(plain):.1f} s, spectral {statistics.median(fast):.1f} s")
    print(
        f"agreement: max |best-match difference| {diff:.2e}; intruders {result.counts()['tuned']} vs {n_ref}"
    )
    print(
        f"RATIO intruders_speedup = {ratio:.2f}x "
        f"(goal >= 2x; spectral {statistics.median(fast):.1f} s, goal <= 30 s)"
    )


if __name__ == "__main__":
    main()
