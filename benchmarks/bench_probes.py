"""Benchmark: the batched torch probe trainer vs scikit-learn LogisticRegression fitted layer by layer.

Both fit the same objective (L2, the same C, multinomial for >2 classes, intercept unpenalised) on the
same standardised activations of every layer of both models of the SmolLM2 pair, on the same seeded
split by item; the script prints the wall-time ratio and the per-layer test-accuracy difference.

Activations: the last token of the fact-completion prompts (``--task pik``: all 748 facts, label = the
model knows the fact, binary) or of entity-tracking prompts (``--task et``: label = the queried
object's sentence, 3 classes). They are captured once and kept in ``~/.cache/tunelens/bench``.
``--synthetic`` uses random activations of the same shape instead (no model needed).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_probes.py --task pik
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch


def real_acts(task: str, n_contexts: int):
    from safetensors.torch import load_file, save_file

    from probes.studies.capture import capture_last
    from probes.studies.knowledge import _answer_ids, _prompts, sample_facts
    from probes.studies.settings import FactSettings
    from tunelens.models import zoo
    from tunelens.tasks import entity_tracking as et

    pair = zoo.load_pair("smollm2-et")
    h = pair.hashes()
    home = Path(os.environ.get("TUNELENS_HOME", Path.home() / ".cache" / "tunelens"))
    cache = home / "bench" / f"probes-{task}-{n_contexts}-{h['base']}-{h['tuned']}.safetensors"
    if task == "pik":
        facts = sample_facts(FactSettings())
        data = _prompts(facts)
    else:
        data = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=n_contexts), seed=0)
    items = [e.item_id for e in data]
    if cache.exists():
        t = load_file(str(cache))
        return {r: t[r] for r in ("base", "tuned")}, {r: t[f"y_{r}"] for r in ("base", "tuned")}, items
    t0 = time.time()
    acts, top = capture_last(pair, data, batch_size=16, progress=print)
    if task == "pik":
        answers = _answer_ids(pair, data)
        ys = {r: (top[r] == answers).long() for r in top}
    else:
        y = torch.tensor([e.meta["query_index"] for e in data])
        ys = {"base": y, "tuned": y.clone()}  # safetensors refuses shared storage
    print(f"captured in {time.time() - t0:.0f}s -> {cache}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {**{r: a.contiguous() for r, a in acts.items()}, **{f"y_{r}": y for r, y in ys.items()}}, str(cache)
    )
    return acts, ys, items


def synthetic_acts(n: int, n_layer: int = 30, d: int = 576, k: int = 2):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (n,), generator=g)
    acts = {}
    for r in ("base", "tuned"):
        x = torch.randn(n_layer, n, d, generator=g)
        x += torch.linspace(0, 1, n_layer)[:, None, None] * torch.randn(k, d, generator=g)[y] * 0.3
        acts[r] = x
    return acts, {"base": y, "tuned": y}, [f"i{i}" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["pik", "et"], default="pik")
    ap.add_argument("--contexts", type=int, default=400, help="entity-tracking worlds (--task et)")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--test-fraction", type=float, default=0.45)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; their medians are compared")
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from probes import ProbeConfig, fit_probes
    from probes.split import split_indices

    if args.synthetic:
        acts, ys, items = synthetic_acts(760)
        source = "synthetic [30 layers, 760 examples, 576 dims] x 2 models"
    else:
        acts, ys, items = real_acts(args.task, args.contexts)
        source = f"SmolLM2 pair smollm2-et, resid_post, last token, task {args.task}"
    n_layer, n, d = acts["base"].shape
    cfg = ProbeConfig(
        C=args.C,
        test_fraction=args.test_fraction,
        control=False,
        shuffled=False,
        transfer=False,
        min_test_items=300,
    )
    tr, te = split_indices(items, test_fraction=cfg.test_fraction, seed=cfg.seed)
    k = len(torch.unique(torch.cat(list(ys.values()))))
    print(f"activations: {source}; {n_layer} layers x {n} examples x {d} dims per model, {k} classes")
    print(
        f"split by item: {len(tr)} train / {len(te)} test examples; torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )

    # ours: every layer of both models (standardise, fit, score) in one call
    times_ours = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        res = fit_probes(acts, ys, items, cfg)
        times_ours.append(time.perf_counter() - t0)

    # scikit-learn: one LogisticRegression per (model, layer) on the same standardised split
    def sklearn_fits():
        acc = np.zeros((2, n_layer))
        iters = []
        for ri, role in enumerate(("base", "tuned")):
            y = ys[role].numpy()
            for layer in range(n_layer):
                x = acts[role][layer].double().numpy()
                scaler = StandardScaler().fit(x[tr])
                m = LogisticRegression(C=args.C, max_iter=10000).fit(scaler.transform(x[tr]), y[tr])
                acc[ri, layer] = (m.predict(scaler.transform(x[te])) == y[te]).mean()
                iters.append(int(m.n_iter_.max()))
        return acc, iters

    times_sk = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        sk_acc, iters = sklearn_fits()
        times_sk.append(time.perf_counter() - t0)
    t_ours, t_sk = float(np.median(times_ours)), float(np.median(times_sk))
    print(
        f"wall times over {args.repeat} runs, ours: {', '.join(f'{t:.2f}' for t in times_ours)} s; "
        f"scikit-learn: {', '.join(f'{t:.2f}' for t in times_sk)} s (medians compared)"
    )

    ours = res.scores["task"][:, 0].numpy()
    diff = np.abs(ours - sk_acc) * 100
    print(
        f"\nscikit-learn (lbfgs, tol 1e-4, layer by layer, {2 * n_layer} fits): {t_sk:8.2f} s "
        f"(median {int(np.median(iters))} iterations)"
    )
    solver = "Newton in the span of the training examples" if k == 2 else "preconditioned batched L-BFGS"
    print(
        f"tunelens fit_probes (all layers of both models in one optimisation: {solver}, tol {cfg.tol:g}): "
        f"{t_ours:8.2f} s (converged {int(res.converged.sum())}/{res.converged.numel()})"
    )
    print(f"speed ratio sklearn / ours: {t_sk / t_ours:.1f}x   (target >= 10x)")
    print(
        f"per-layer test accuracy |ours - sklearn|: max {diff.max():.2f} points, mean {diff.mean():.3f} "
        f"(target <= 1 point); identical on {(diff < 1e-9).sum()}/{diff.size} layers"
    )
    for ri, role in enumerate(("base", "tuned")):
        best = int(ours[ri].argmax())
        print(
            f"  {role}: best layer {best}: ours {ours[ri, best]:.3f}, sklearn {sk_acc[ri, best]:.3f}; "
            f"majority {float(res.chance[ri, 0]):.3f}"
        )


if __name__ == "__main__":
    main()
