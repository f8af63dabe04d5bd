"""How long ``circuits.knob.steering.steer`` takes on SmolLM2 for a short prompt, against plain generation.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_knob_steer.py``. Prints seconds and the ratio
steered / unsteered (the hook should cost almost nothing); the app needs a short prompt in about 2 s.
"""

from __future__ import annotations

import time

import torch

from circuits.knob.steering import steer
from tunelens.directions import Direction
from tunelens.models import zoo
from tunelens.sites import Site

PROMPT = "Context: The capital of France is Rome.\nQuestion: What is the capital of France?\nAnswer:"


def main(repeats: int = 3, max_new_tokens: int = 12) -> None:
    pair = zoo.load_pair("smollm2-knob")
    model = pair.tuned
    u = Direction(site=Site("resid_post", 15), vector=torch.randn(model.dims.d_model))
    model.generate(PROMPT, max_new_tokens=2)  # warm-up
    t_plain, t_steer = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        model.generate(PROMPT, max_new_tokens=max_new_tokens)
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        steer(model, u, PROMPT, 3.0, max_new_tokens)
        t_steer.append(time.perf_counter() - t)
    plain, steered = min(t_plain), min(t_steer)
    print(
        f"plain generate: {plain:.2f} s, steer: {steered:.2f} s, ratio {steered / plain:.2f} "
        f"({max_new_tokens} new tokens)"
    )


if __name__ == "__main__":
    main()
