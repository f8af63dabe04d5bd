"""Attribution patching against finite differences through the (separately verified) patching engine."""

from __future__ import annotations

from dataclasses import replace as dc_replace

import numpy as np
import pytest
import torch

from circuits.patching.attribution import agreement, at_position, attribute, pearson, topk_overlap
from circuits.patching.engine import Patch, run_cells, trace
from circuits.patching.metrics import Answers, logit_diff
from circuits.patching.sweeps import SweepConfig, activation_patching
from tests.unit.circuits.conftest import induction_data
from tunelens.sites import Site


@pytest.fixture(scope="module")
def runs(induction_model, tiny_tok):
    clean, corrupt = induction_data(tiny_tok, n=4)
    answers = Answers.from_encoded(clean, foil=corrupt)
    return (
        clean,
        corrupt,
        answers,
        trace(induction_model, clean.tokens, record=["z"]),
        trace(induction_model, corrupt.tokens, record=["z"]),
    )


@pytest.mark.parametrize("kind", ["z", "resid_pre"])
def test_attribution_is_the_derivative_of_the_patching_effect(runs, kind):
    """Patching target + eps·(source − target) changes the metric by eps × the attribution, to O(eps²)."""
    _, _, answers, source, target = runs
    eps = 1e-3
    if kind == "z":
        acts = {
            k: target.trace.acts[k] + eps * (source.trace.acts[k] - target.trace.acts[k])
            for k in target.trace.acts
        }
        nudged = dc_replace(source, trace=dc_replace(source.trace, acts=acts))
        cells = [
            (Patch(Site("z", layer, h), pos),) for layer in range(2) for pos in (5, 30) for h in range(4)
        ]
    else:
        resid = [t + eps * (s - t) for s, t in zip(source.trace.resid, target.trace.resid, strict=True)]
        nudged = dc_replace(source, trace=dc_replace(source.trace, resid=resid))
        cells = [(Patch(Site("resid_pre", layer), pos),) for layer in range(2) for pos in (5, 15, 30)]
    base = logit_diff(target.last(answers)).mean()
    exact = (logit_diff(run_cells(target, nudged, cells, answers)).mean(-1) - base) / eps
    per_prompt = attribute(target, source, answers, kind)
    est = torch.stack([at_position(per_prompt, c[0].position)[c[0].layer] for c in cells])
    if kind == "z":
        est = torch.stack([est[i, c[0].head] for i, c in enumerate(cells)])
    assert exact.abs().max() > 1e-2
    assert torch.allclose(est, exact, atol=2e-2 * float(exact.abs().max()))


def test_agreement_with_the_exact_sweep(induction_model, runs):
    clean, corrupt, answers, source, target = runs
    exact = activation_patching(
        induction_model, clean, corrupt, SweepConfig(kind="resid_pre", by="layer_pos")
    )
    est = attribute(target, source, answers, "resid_pre").mean(dim=1)
    delta = exact.values["logit_diff"] - exact.target["logit_diff"]
    res = agreement(
        est,
        delta,
        kind="resid_pre",
        direction="clean -> corrupt",
        axes=exact.axes,
        labels=exact.labels,
        topk=5,
    )
    assert res.correlation == pytest.approx(np.corrcoef(est.reshape(-1), delta.reshape(-1))[0, 1], abs=1e-6)
    assert 0.0 <= res.topk_overlap <= 1.0
    assert res.summary()["cells"] == delta.numel()
    assert res.figure().layout.xaxis.title.text.startswith("exact")


def test_overlap_and_correlation_helpers():
    a = torch.tensor([5.0, -4.0, 0.1, 0.2])
    assert topk_overlap(a, torch.tensor([1.0, 2.0, 0.0, 0.0]), 2) == 1.0
    assert topk_overlap(a, torch.tensor([0.0, 0.0, 1.0, 2.0]), 2) == 0.0
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
