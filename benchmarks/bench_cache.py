"""Cost of caching every layer's resid_post (last position) for a pair, against plain HF forwards.

Candidate: ``tunelens.cache.capture_pair`` with all 30 ``resid_post`` sites at ``positions="last"``,
once per backend (``bridge``, ``nnsight``). Baseline: ``model.hf(input_ids=..., attention_mask=...)`` of
both models under ``torch.no_grad`` on the very same batches (same batch size, same trimming to the
longest prompt of the batch). Everything is warmed up once; then each repeat times the baseline and
every candidate back to back, in an order that rotates between repeats. The ratio is the median over
repeats of (candidate time / that repeat's baseline time); the ratio of the medians is printed too.

    .venv/bin/python benchmarks/bench_cache.py [--quick] [--repeats 5] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import median, paired_ratio, perturbed_pair, prompts, timed

from tunelens.cache import CacheConfig, capture_pair
from tunelens.models.pair import ModelPair
from tunelens.sites import all_layers
from tunelens.tasks.base import Encoded

GOAL = 1.10  # transformer-lens' own run_with_cache costs 1.17x a plain forward


def batches(enc: Encoded, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches ``capture`` runs: consecutive slices, trimmed to their longest prompt."""
    out = []
    for start in range(0, len(enc), batch_size):
        tok = enc.tokens.select(slice(start, start + batch_size))
        width = int(tok.lengths.max())
        out.append((tok.input_ids[:, :width], tok.attention_mask[:, :width]))
    return out


@torch.no_grad()
def hf_forward(pair: ModelPair, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for _, model in pair:
        for ids, mask in data:
            model.hf(input_ids=ids, attention_mask=mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 prompts instead of 64")
    ap.add_argument("--n", type=int, default=None, help="number of prompts (default 64, quick 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default="bridge,nnsight")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n or (16 if args.quick else 64)
    backends = [b for b in args.backends.split(",") if b]

    pair = perturbed_pair()
    enc = prompts(n).encode(pair.tokenizer)
    sites = tuple(all_layers(pair.dims, "resid_post"))
    cfgs = {
        b: CacheConfig(sites=sites, positions="last", batch_size=args.batch_size, backend=b) for b in backends
    }
    data = batches(enc, args.batch_size)
    runs = {"hf forward": lambda: hf_forward(pair, data)}
    for b, cfg in cfgs.items():
        runs[f"capture_pair[{b}]"] = lambda cfg=cfg: capture_pair(pair, enc, cfg)

    # Sanity: the cache holds what a plain forward computes (HF's hidden_states[L + 1] is resid_post L,
    # except the last entry, which has the final norm applied; so check the second-to-last layer).
    got = capture_pair(pair, enc.select(slice(0, 2)), next(iter(cfgs.values())))
    with torch.no_grad():
        ids, mask = batches(enc.select(slice(0, 2)), 2)[0]
        hs = pair.base.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    last = enc.tokens.last[:2]
    err = (got["base"][sites[-2]] - hs[-2][torch.arange(2), last]).abs().max().item()
    print(f"sanity: max |cache - hf| at {sites[-2]} = {err:.2e}")

    for fn in runs.values():  # warm-up: builds the backends (bridge deep copies, nnsight wrap)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(runs[name]))

    base = times["hf forward"]
    print(f"\n{n} prompts x 2 models, batch {args.batch_size}, {len(sites)} resid_post sites, last position,")
    setting = f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    print(f"{args.repeats} interleaved repeats, {setting}; wall-clock seconds\n")
    print(f"{'run':<24}{'median':>9}{'min':>9}{'max':>9}{'med/med':>9}{'paired':>8}")
    ratios = {}
    for name, ts in times.items():
        ratios[name] = paired_ratio(ts, base)
        row = f"{median(ts):>9.3f}{min(ts):>9.3f}{max(ts):>9.3f}{median(ts) / median(base):>9.2f}"
        print(f"{name:<24}{row}{ratios[name]:>8.2f}")
    print()
    for b in backends:
        ratio = ratios[f"capture_pair[{b}]"]
        status = "ok" if ratio <= GOAL else "MISSED"
        print(f"RATIO cache_overhead_{b} = {ratio:.2f} (goal <= {GOAL:.2f}) {status}")


if __name__ == "__main__":
    main()
