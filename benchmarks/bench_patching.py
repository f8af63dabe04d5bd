"""Patching speed on SmolLM2 (the demo pair), or (``--model gpt2-shape``) on a random-init GPT-2 of
realistic shape (12 layers, d_model 768: Conv1D and a fused c_attn, so the fused path is timed at a real
size): the fast engine against one full forward per site.

1. Residual stream, layer × position (30 layers × the last 10 positions), clean -> corrupt entity
   tracking: ``circuits`` engine vs ``transformer_lens.patching.get_act_patch_resid_pre`` on the bridge.
2. CMAP, every head (30 × 9 = 270) at the last position, tuned -> base: one batched sweep vs a loop
   of one backend forward per head (``Write.replace`` of that head's z), and vs the engine run one head
   at a time (what batching alone buys).

Both sides run in the same process, back to back, and are checked to agree; the machine is shared, so
only the ratios mean anything. Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_patching.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import gpt2_shape_pair

from circuits.patching.cmap import cmap_sweep, trace_pair
from circuits.patching.engine import Patch, run_cells, trace
from circuits.patching.metrics import Answers, logit_diff
from tunelens.backends.base import replace
from tunelens.backends.tl_patching import tl_patch_sweep
from tunelens.models import zoo
from tunelens.sites import Site
from tunelens.tasks import entity_tracking as et


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=2, help="worlds (prompts = 3 x contexts)")
    ap.add_argument("--positions", type=int, default=10)
    ap.add_argument(
        "--sample", type=int, default=0,
        help="time the one-forward-per-site baselines on every N-th site only and scale up (0: all sites)",
    )  # fmt: skip
    ap.add_argument("--model", choices=("smollm2", "gpt2-shape"), default="smollm2")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    pair = zoo.load_pair("smollm2-et") if args.model == "smollm2" else gpt2_shape_pair()
    ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=args.contexts), seed=0)
    clean, corrupt = ds.encode(pair.tokenizer), et.counterfactuals(ds, "query", seed=1).encode(pair.tokenizer)
    model, dims = pair.tuned, pair.dims
    T = clean.tokens.input_ids.shape[1]
    positions = list(range(T - args.positions, T))
    index = [(layer, p) for layer in range(dims.n_layers) for p in positions]
    answers = Answers.from_encoded(clean, foil=corrupt)
    last = clean.tokens.last

    def tl_metric(logits):
        lg = logits[torch.arange(len(last)), last]
        return (lg.gather(1, clean.answer_ids[:, None]) - lg.gather(1, corrupt.answer_ids[:, None])).mean()

    print(
        f"{args.model} tuned ({dims.n_layers} layers, d_model {dims.d_model}), {len(clean)} prompts of "
        f"{T} tokens, {len(index)} residual sites"
    )
    backend = model.backend("bridge")
    tl_patch_sweep(
        backend,
        clean.tokens.input_ids,
        corrupt.tokens.input_ids,
        tl_metric,
        "resid_pre",
        index=index[:1],
    )

    def ours():
        src, tgt = trace(model, clean.tokens), trace(model, corrupt.tokens)
        cells = [(Patch(Site("resid_pre", layer), p),) for layer, p in index]
        return logit_diff(run_cells(tgt, src, cells, answers)).mean(-1)

    fast, t_fast = timed(ours)
    print(f"residual layer x position: engine {t_fast:.2f} s for {len(index)} sites", flush=True)
    step = args.sample or 1
    picked = list(range(0, len(index), step))
    ref, t_tl = timed(
        lambda: tl_patch_sweep(
            backend, clean.tokens.input_ids, corrupt.tokens.input_ids, tl_metric, "resid_pre",
            index=[index[i] for i in picked],
        )
    )  # fmt: skip
    t_tl_all = t_tl * len(index) / len(picked)
    scaled = "" if step == 1 else f" (timed on {len(picked)} sites, scaled to {len(index)})"
    print(f"  transformer_lens.patching {t_tl_all:.2f} s{scaled}, ratio {t_tl_all / t_fast:.1f}x, "
          f"max |diff| on those sites {float((fast[picked] - ref).abs().max()):.1e}", flush=True)  # fmt: skip

    # CMAP over all heads at the last position
    runs = trace_pair(pair, clean)
    sweep, t_batched = timed(lambda: cmap_sweep(pair, clean, runs=runs))
    print(f"CMAP batched sweep of all heads: {t_batched:.2f} s", flush=True)
    pos = int(last[0])
    cells = [
        (Patch(Site("z", layer, h), pos),) for layer in range(dims.n_layers) for h in range(dims.n_heads)
    ]
    _, t_single = timed(lambda: [run_cells(runs.base, runs.tuned, [c], runs.answers) for c in cells[::step]])
    t_single *= step
    z = runs.tuned.trace.acts
    base_backend = pair.base.backend("bridge")
    rows = torch.arange(len(last))

    heads = [(layer, h) for layer in range(dims.n_layers) for h in range(dims.n_heads)][::step]

    def loop():
        out = []
        for layer, h in heads:
            w = replace(Site("z", layer, h), z[(layer, "z")][rows, last, h], positions=last)
            out.append(base_backend.run(clean.tokens, writes=[w]).logits[rows, last])
        return out

    _, t_loop = timed(loop)
    t_loop *= len(cells) / len(heads)
    print(f"CMAP all {len(cells)} heads: batched sweep {t_batched:.2f} s, engine one head at a time "
          f"{t_single:.2f} s ({t_single / t_batched:.1f}x), one backend forward per head {t_loop:.2f} s "
          f"(ratio {t_loop / t_batched:.1f}x)")  # fmt: skip
    del sweep


if __name__ == "__main__":
    main()
