"""Minimality pruning: on the toy with planted groups, heads planted to be useless are pruned and the
value fetcher (the only head writing to the logits) is kept; every decision equals the paper's rule applied
to accuracies from an independent mean-ablation loop."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from circuits.circuit.minimality import prune, relative_drop
from tests.unit.circuits.planted_groups import PLANTED, planted_model
from tunelens.backends.stepwise import Stepper
from tunelens.errors import ConfigError
from tunelens.results import load_result
from tunelens.tasks import entity_tracking as et

USELESS = {"value_fetcher": (3, 0), "position_transmitter": (2, 1)}  # write only where nothing reads
POSITIONS = {"value_fetcher": "last", "position_transmitter": "last", "position_detector": "query_label",
             "structure_reader": "prev_query_label"}  # fmt: skip


@pytest.fixture(scope="module")
def toy(tiny_tok):
    model = planted_model(tiny_tok)
    ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=8), seed=0)
    data = ds.encode(tiny_tok)
    with torch.no_grad():  # the answer is what the whole toy says among the candidates: F(model) = 1
        logits = Stepper(model.module).trace(data.tokens.input_ids, data.tokens.last).logits
    best = logits.gather(1, data.candidate_ids).argmax(1)
    data = replace(data, answer_ids=data.candidate_ids[torch.arange(len(data)), best])
    ref_ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=8), seed=9)
    reference = et.counterfactuals(ref_ds, "context", seed=1).encode(tiny_tok)
    circuit = {g: [(*PLANTED[g], POSITIONS[g])] for g in POSITIONS}
    for g, h in USELESS.items():
        circuit[g].append((*h, POSITIONS[g]))
    return model, data, reference, circuit


def _accuracy(model, data, reference, heads, positions=None) -> float:
    """Everything but ``heads`` (layer, head, position name) replaced by its per-position reference mean;
    with ``positions`` (position names) only there, every other position keeping its own activation."""
    st = Stepper(model.module)
    with torch.no_grad():
        ref = st.trace(reference.tokens.input_ids, reference.tokens.last, record=["z"])
        means = {lay: ref.acts[(lay, "z")].mean(0) for lay in range(model.dims.n_layers)}  # pos head d
        rows = torch.arange(len(data))

        def hook(lay, kind, t):
            if kind != "z":
                return None
            out = means[lay][None].expand_as(t).clone()
            if positions is not None:
                out = t.clone()
                for name in positions:
                    p = data.positions[name]
                    out[rows, p] = means[lay][p]
            for hl, hh, pos in heads:
                if hl == lay:
                    p = data.positions[pos]
                    out[rows, p, hh] = t[rows, p, hh]
            return out

        logits = st.trace(data.tokens.input_ids, data.tokens.last, hook=hook).logits
    pred = data.candidate_ids[rows, logits.gather(1, data.candidate_ids).argmax(1)]
    return float((pred == data.answer_ids).float().mean())


def test_useless_heads_are_pruned_and_decisions_follow_the_rule(toy):
    model, data, reference, circuit = toy
    assert all((reference.tokens.lengths == n).all() for n in data.tokens.lengths)  # per-position means align
    res = prune(model, data, circuit, reference=reference)
    nodes = [(g, h) for g, hs in circuit.items() for h in hs]

    def f(removed):
        return _accuracy(model, data, reference, [h for i, (_, h) in enumerate(nodes) if i not in removed])

    expected = {}
    for i, (g, h) in enumerate(nodes):
        mates = [j for j, (g2, _) in enumerate(nodes) if g2 == g and j != i]
        k = min(math.ceil(0.3 * (len(mates) + 1)), len(mates))
        pair = {j: f({i, j}) for j in mates}
        partners = sorted(mates, key=lambda j: (pair[j], j))[:k]
        with_v, without_v = f(set(partners)), f({*partners, i})
        drop = (
            math.inf
            if without_v == 0 and with_v > 0
            else (0.0 if without_v == 0 else (with_v - without_v) / without_v)
        )
        expected[(g, h[0], h[1])] = drop >= 0.01
    got = {(r["group"], r["layer"], r["head"]): r["kept"] for r in res.heads}
    assert got == expected
    assert not got[("value_fetcher", *USELESS["value_fetcher"])]
    assert not got[("position_transmitter", *USELESS["position_transmitter"])]
    assert got[("value_fetcher", *PLANTED["value_fetcher"])]  # nothing else writes to the logits
    assert res.f_full == 1.0 and res.f_circuit == pytest.approx(f(set()))
    kept = [h for g, hs in circuit.items() for h in hs if got[(g, h[0], h[1])]]
    assert res.f_minimal == pytest.approx(_accuracy(model, data, reference, kept))
    assert [tuple(h) for h in res.minimal["value_fetcher"]] == [(*PLANTED["value_fetcher"], "last")]


def test_positions_scope_ablates_only_at_the_candidate_circuits_positions(toy):
    """Every sub-circuit is ablated at the same positions, those of the whole candidate circuit."""
    model, data, reference, circuit = toy
    res = prune(model, data, circuit, reference=reference, scope="positions")
    nodes = [(g, h) for g, hs in circuit.items() for h in hs]
    at = sorted({h[2] for _, h in nodes})

    def f(removed):
        heads = [h for i, (_, h) in enumerate(nodes) if i not in removed]
        return _accuracy(model, data, reference, heads, positions=at)

    for i, (row, (g, _)) in enumerate(zip(res.heads, nodes, strict=True)):
        index = {(g2, *x[:2]): j for j, (g2, x) in enumerate(nodes)}
        partners = [index[(g, *p)] for p in row["partners"]]
        assert row["f_without_partners"] == pytest.approx(f(set(partners)))
        assert row["f_without_both"] == pytest.approx(f({*partners, i}))
    assert res.f_circuit == pytest.approx(f(set()))
    assert res.scope == "positions" and res.summary()["scope"] == "positions"
    with pytest.raises(ConfigError, match="scope must be"):
        prune(model, data, circuit, reference=reference, scope="everywhere")


def test_relative_drop_edges():
    assert relative_drop(0.5, 0.25) == 1.0
    assert relative_drop(0.2, 0.0) == math.inf and relative_drop(0.0, 0.0) == 0.0
    assert relative_drop(0.3, 0.4) == pytest.approx(-0.25)


def test_result_roundtrip_figure_and_bad_inputs(toy, tmp_path):
    model, data, reference, circuit = toy
    res = prune(model, data, {"value_fetcher": circuit["value_fetcher"]}, reference=reference, metric="prob")
    back = load_result(res.save(tmp_path / "minimal"))
    assert back.summary() == res.summary() and len(back.to_frame()) == 2
    fig = res.figure()
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert {d.name.split(":")[1].split("(")[0].strip() for d in fig.data} == {"kept", "pruned"}
    with pytest.raises(ConfigError, match="pruning metric"):
        prune(model, data, circuit, reference=reference, metric="loss")
    with pytest.raises(ConfigError, match="at least one head"):
        prune(model, data, {"a": []}, reference=reference)
