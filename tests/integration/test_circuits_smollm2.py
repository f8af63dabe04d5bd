"""The patching engine and CMAP on the real SmolLM2 pair (GQA 9/3, LoRA switch pair)."""

from __future__ import annotations

import pytest
import torch

from circuits.patching.cmap import cmap_sweep, trace_pair
from circuits.patching.engine import Patch, run_cells, trace
from circuits.patching.metrics import Answers, logit_diff
from tunelens.backends.base import replace
from tunelens.models import zoo
from tunelens.sites import Site
from tunelens.tasks import entity_tracking as et

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair("smollm2-et")


@pytest.fixture(scope="module")
def data(pair):
    ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=1), seed=0)
    return ds.encode(pair.tokenizer), et.counterfactuals(ds, "query", seed=1).encode(pair.tokenizer)


def test_engine_equals_one_backend_forward_per_site(pair, data):
    clean, corrupt = data
    model = pair.tuned
    T = clean.tokens.input_ids.shape[1]
    qpos = int(clean.positions["query_label"][0])
    cells = [(Patch(Site("resid_pre", layer), p),) for layer in (0, 14, 29) for p in (qpos, T - 1)]
    cells += [(Patch(Site("z", 20, h), T - 1),) for h in (0, 4, 8)] + [(Patch(Site("v", 10, 2), qpos),)]
    source = trace(model, clean.tokens, record=["z", "v"])
    target = trace(model, corrupt.tokens)
    answers = Answers.from_encoded(clean, foil=corrupt)
    ours = logit_diff(run_cells(target, source, cells, answers))
    backend = model.backend("bridge")
    acts = backend.run(
        clean.tokens, reads=[Site("resid_pre", x) for x in (0, 14, 29)] + [Site("z", 20), Site("v", 10)]
    ).acts
    rows = torch.arange(len(clean))
    for i, (p,) in enumerate(cells):
        whole = acts[Site(p.kind, p.layer)]
        value = (whole if p.head is None else whole[:, :, p.head])[:, p.position]
        logits = backend.run(
            corrupt.tokens, writes=[replace(Site(p.kind, p.layer, p.head), value, positions=p.position)]
        ).logits
        lg = logits[rows, clean.tokens.last]
        ref = lg.gather(1, clean.answer_ids[:, None])[:, 0] - lg.gather(1, corrupt.answer_ids[:, None])[:, 0]
        assert torch.allclose(ours[i], ref, atol=1e-3), p  # fp32 over 30 layers; logits of order 10


def test_cmap_of_the_tuned_model_into_itself_is_a_no_op(pair, data):
    clean, _ = data
    runs = trace_pair(pair, clean)
    same = type(runs)(base=runs.tuned, tuned=runs.tuned, answers=runs.answers)
    sweep = cmap_sweep(pair, clean, runs=same)
    assert (sweep.values["logit_diff"] - sweep.target["logit_diff"]).abs().max() <= 1e-3
    assert sweep.values["logit_diff"].shape == (30, 9)
