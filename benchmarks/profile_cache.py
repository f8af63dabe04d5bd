"""Where the time of ``capture`` goes: a layer-by-layer breakdown for one model, plus a cProfile.

Each step adds one thing to the one before, all on the same batches, interleaved and repeated:

    hf forward          model.hf(input_ids, attention_mask)                  (the baseline)
    bridge, no hooks    the backend's TransformerBridge forward, nothing attached
    bridge.run(reads)   BridgeBackend.run with the 30 resid_post reads (hooks on, full activations kept)
    capture[bridge]     tunelens.cache.capture (adds the last-position gather and the dtype/device cast)
    nnsight, no reads   NNsightBackend.run with no reads (a bare trace that returns logits)
    nnsight.run(reads)  NNsightBackend.run with the 30 reads
    capture[nnsight]    tunelens.cache.capture through nnsight

    .venv/bin/python benchmarks/profile_cache.py [--quick] [--cprofile bridge|nnsight]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats

import torch
from _common import median, paired_ratio, perturbed_pair, prompts, timed

from tunelens.backends.base import TokenBatch
from tunelens.cache import CacheConfig, capture
from tunelens.sites import all_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 prompts instead of 64")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cprofile", choices=["bridge", "nnsight", "none"], default="bridge")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = 16 if args.quick else 64

    model = perturbed_pair().base
    enc = prompts(n).encode(model.tokenizer)
    sites = list(all_layers(model.dims, "resid_post"))
    bridge, nns = model.backend("bridge"), model.backend("nnsight")
    batches = []
    for start in range(0, n, args.batch_size):
        tok = enc.tokens.select(slice(start, start + args.batch_size))
        w = int(tok.lengths.max())
        batches.append(TokenBatch(input_ids=tok.input_ids[:, :w], attention_mask=tok.attention_mask[:, :w]))
    cfg = {
        b: CacheConfig(sites=tuple(sites), batch_size=args.batch_size, backend=b)
        for b in ("bridge", "nnsight")
    }

    @torch.no_grad()
    def each(fn):
        return lambda: [fn(b) for b in batches]

    steps = {
        "hf forward": each(lambda b: model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)),
        "bridge, no hooks": each(
            lambda b: bridge._bridge(b.input_ids, attention_mask=b.attention_mask, return_type="logits")
        ),
        "bridge.run(reads)": each(lambda b: bridge.run(b, reads=sites, logits=False)),
        "capture[bridge]": lambda: capture(model, enc, cfg["bridge"]),
        "nnsight, no reads": each(lambda b: nns.run(b, logits=True)),
        "nnsight.run(reads)": each(lambda b: nns.run(b, reads=sites, logits=False)),
        "capture[nnsight]": lambda: capture(model, enc, cfg["nnsight"]),
    }
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(steps[name]))

    base = times["hf forward"]
    print(f"\none model, {n} prompts, batch {args.batch_size}, {args.repeats} repeats, ", end="")
    print(f"load average {os.getloadavg()[0]:.1f}; wall-clock seconds")
    print(f"{'step':<22}{'median':>9}{'min':>9}{'x hf':>7}{'ms/batch over hf':>18}")
    for name, ts in times.items():
        extra = 1000 * (median(ts) - median(base)) / len(batches)
        print(f"{name:<22}{median(ts):>9.3f}{min(ts):>9.3f}{paired_ratio(ts, base):>7.2f}{extra:>18.1f}")

    if args.cprofile != "none":
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            capture(model, enc, cfg[args.cprofile])
        prof.disable()
        print(f"\ncProfile of 3 x capture[{args.cprofile}], by own time:")
        pstats.Stats(prof).strip_dirs().sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
