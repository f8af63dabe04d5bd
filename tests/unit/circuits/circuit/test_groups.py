"""The four-group search: known answers on a toy with the groups planted in its weights, path attribution
against finite differences of exact path patching, and the structure-reader step (corrupt activation
read at another position) against a from-scratch two-step run."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from circuits.circuit.groups import (
    GroupSearchConfig,
    GroupStep,
    find_groups,
    moved_source,
    path_attribution,
)
from circuits.patching.engine import trace
from circuits.patching.metrics import Answers
from circuits.patching.path_patching import path_patching, receiver_units
from tests.unit.circuits.conftest import induction_data
from tests.unit.circuits.planted_groups import PLANTED, planted_model
from tunelens.backends.stepwise import Stepper
from tunelens.errors import ConfigError, ShapeError
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.results import load_result
from tunelens.tasks import entity_tracking as et

NAMES = ("value_fetcher", "position_transmitter", "position_detector", "structure_reader")


@pytest.fixture(scope="module")
def toy(tiny_tok):
    model = planted_model(tiny_tok)
    ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=4), seed=0)
    return model, ds.encode(tiny_tok), et.counterfactuals(ds, "context", seed=1).encode(tiny_tok)


def _float64(model: LoadedModel) -> LoadedModel:
    name = f"{model.name}-f64"
    return LoadedModel(
        copy.deepcopy(model.hf).double(),
        model.tokenizer,
        source=ModelSource(kind="memory", location=name),
        name=name,
    )


# Bounds on the score of a candidate with no path to the receivers, which is zero in exact arithmetic. In
# float64 the planted toy gives exactly 0.0 (a bound of 1e-9 leaves float64 rounding, ~1e-16 amplified by the
# norms' 1e4 gain, far below it). In float32 the patched and the clean forward reach the same numbers by
# different routes and differ at float32 rounding of logits of ~1e2: measured 0 to 1.5e-5 over MKL's code
# paths, against planted effects of 2.9e-4 (position detector) to 3.5e-2, so the float32 bound is relative:
# a quarter of the planted head's score in the same step.
NO_PATH_BOUND = {torch.float64: 1e-9}
NO_PATH_FRACTION = {torch.float32: 0.25}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_the_search_finds_each_planted_head_in_its_group(toy, dtype):
    model, clean, corrupt = toy
    if dtype == torch.float64:
        model = _float64(model)
    # small candidate pools: the planted heads must survive the attribution preselection, too
    cfg = GroupSearchConfig(top_k=(1, 1, 1, 1), n_candidates=(4, 3, 2, 2), rank="abs")
    res, runs = find_groups(model, clean, corrupt, cfg)
    assert {g: [tuple(h) for h in hs] for g, hs in res.groups.items()} == {g: [PLANTED[g]] for g in NAMES}
    assert res.n_checked() == dict(zip(NAMES, (4, 3, 2, 2), strict=True))
    # every other candidate of the value-reading steps has no path at all: zero effect, up to rounding
    for g in ("position_transmitter", "position_detector", "structure_reader"):
        others = [s for h, s in zip(res.candidates[g], res.score[g], strict=True) if tuple(h) != PLANTED[g]]
        planted = abs(res.score[g][res.candidates[g].index(list(PLANTED[g]))])
        bound = NO_PATH_BOUND.get(dtype, NO_PATH_FRACTION.get(dtype, 0.0) * planted)
        assert max(abs(s) for s in others) <= bound, (g, others, planted)
        assert planted > 1e-4, (g, planted)  # the planted path is real: >= 1e5 times the float64 bound
    assert runs["position_detector"].via == "v" and runs["position_detector"].units == [[2, 0]]  # B's group


def test_heads_in_both_fetcher_and_transmitter_lists_stay_transmitters(toy):
    model, clean, corrupt = toy
    cfg = GroupSearchConfig(top_k=(3, 1, 1, 1), n_candidates=(16, 8, 4, 4), rank="abs")
    res, runs = find_groups(model, clean, corrupt, cfg)
    b = list(PLANTED["position_transmitter"])
    vf = runs["value_fetcher"].relative_prob().abs()
    top3 = [res.candidates["value_fetcher"][i] for i in vf.argsort(descending=True)[:3].tolist()]
    assert b in top3  # B's residual write moves the final norm a little: it made the fetcher list ...
    assert res.groups["position_transmitter"] == [b]  # ... and is a transmitter
    assert b not in res.groups["value_fetcher"] and res.taken["value_fetcher"] == [b]
    assert len(res.groups["value_fetcher"]) == 2
    # the transmitter step patched into all three fetchers' queries (before B was moved)
    assert [u for u in runs["position_transmitter"].units] == sorted(top3)


def _reference_sr(model, clean, corrupt, sender, receivers):
    """The structure-reader step from scratch: step 1 with the sender's z at the earlier query label taken
    from the corrupt run at its random box label, every later head frozen; step 2 patches the receivers'
    values there. Returns the mean (p_patch − p_clean) / p_clean over the answer probabilities."""
    st = Stepper(model.module)
    rows = torch.arange(len(clean))
    pos, src_pos = clean.positions["prev_query_label"], corrupt.positions["random_label"]
    ids, last = clean.tokens.input_ids, clean.tokens.last
    rec_z: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        st.trace(
            corrupt.tokens.input_ids,
            corrupt.tokens.last,
            hook=lambda lay, k, t: rec_z.setdefault(lay, t) if k == "z" else None,
        )
        clean_z: dict[int, torch.Tensor] = {}
        base = st.trace(ids, last, hook=lambda lay, k, t: clean_z.setdefault(lay, t) if k == "z" else None)
        s_layer, s_head = sender
        recorded: dict[int, torch.Tensor] = {}

        def step1(lay, kind, t):
            if kind == "z" and lay == s_layer:
                t = t.clone()
                t[rows, pos, s_head] = rec_z[lay][rows, src_pos, s_head]
                return t
            if kind == "z" and lay > s_layer:
                return clean_z[lay]
            if kind == "v":
                recorded[lay] = t
            return None

        st.trace(ids, last, hook=step1)
        units = receiver_units(receivers, "v", model.dims.n_heads, model.dims.n_kv_heads)

        def step2(lay, kind, t):
            if kind != "v":
                return None
            t = t.clone()
            for ul, u in units:
                if ul == lay and ul > s_layer:
                    t[rows, pos, u] = recorded[lay][rows, pos, u]
            return t

        patched = st.trace(ids, last, hook=step2)
    p0 = base.logits.softmax(-1)[rows, clean.answer_ids].mean()
    p1 = patched.logits.softmax(-1)[rows, clean.answer_ids].mean()
    return float((p1 - p0) / p0)


def test_structure_reader_scores_match_a_from_scratch_run(tiny_tok):
    """On a random (not planted) model, so that every path carries something."""
    from tests.conftest import make_tiny
    from tunelens.models.tiny import TinyConfig

    # float64: the engine and the reference compute the same paths by different routes
    model = _float64(make_tiny(tiny_tok, seed=5, cfg=TinyConfig(n_layers=6, n_heads=4, n_kv_heads=2)))
    with torch.no_grad():  # strengthen its heads (sharper attention, larger outputs) so paths carry a lot
        for layer in model.hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight *= 6
            layer.self_attn.o_proj.weight *= 8
    ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=3), seed=2)
    clean, corrupt = ds.encode(tiny_tok), et.counterfactuals(ds, "context", seed=3).encode(tiny_tok)
    assert (clean.positions["prev_query_label"] != corrupt.positions["random_label"]).any()
    cfg = GroupSearchConfig(top_k=(3, 3, 3, 3), n_candidates=(16, 12, 8, 6), rank="abs")
    res, runs = find_groups(model, clean, corrupt, cfg)
    assert max(lay for lay, _ in res.groups["position_detector"]) > 0
    receivers = [tuple(h) for h in res.groups["position_detector"]]
    sr = runs["structure_reader"]
    ref = [_reference_sr(model, clean, corrupt, tuple(s), receivers) for s in sr.senders]
    # the result keeps probabilities in float32, so (p_patch - p_clean) / p_clean carries their storage
    # rounding: a few float32 epsilons (1.2e-7) of p / p_clean ~ 1, whatever the model computed in
    got = sr.relative_prob().double()
    assert (got - torch.tensor(ref, dtype=torch.float64)).abs().max() < 1e-6, (got, ref)
    assert max(abs(r) for r in ref) > 1e-3  # not vacuous


def test_path_attribution_is_the_first_order_of_path_patching(induction_model, tiny_tok):
    """Against finite differences of exact path patching: the source moved ε of the way from the target."""
    model = LoadedModel(
        copy.deepcopy(induction_model.hf).double(),
        tiny_tok,
        source=ModelSource(kind="memory", location="induction-f64"),
        name="induction-f64",
    )
    clean, corrupt = induction_data(tiny_tok, n=4)
    answers = Answers.from_encoded(clean, foil=corrupt)
    target = trace(model, corrupt.tokens, record=["z"])
    source = trace(model, clean.tokens, record=["z"])
    eps = 0.05  # central differences: the metrics are read in float32, so ε cannot be tiny

    def moved(e: float):
        acts = {
            key: t + e * (source.trace.acts[key] - t) if key[1] == "z" else t
            for key, t in target.trace.acts.items()
        }
        return replace(source, trace=replace(source.trace, acts=acts))

    senders = [(0, h) for h in range(4)]
    for via, pos, receivers in (("logits", 30, []), ("k", 15, [(1, 0), (1, 3)]), ("q", 30, [(1, 1)])):
        p = torch.full((4,), pos)
        est = path_attribution(
            target, source, answers, receivers=receivers, via=via, sender_pos=p, metric="logit_diff"
        )
        kw = {"senders": senders, "receivers": receivers, "via": via, "sender_pos": pos}
        kw["receiver_pos"] = None if via == "logits" else pos
        up = path_patching(target, moved(eps), answers, **kw).values["logit_diff"]
        down = path_patching(target, moved(-eps), answers, **kw).values["logit_diff"]
        fd = ((up - down) / (2 * eps)).float()
        assert torch.allclose(est[0], fd, rtol=1e-2, atol=2e-5), (via, est[0], fd)
        assert est[0].abs().max() > 1e-3, via  # not vacuous
        if via != "logits":
            assert (est[1] == 0).all()  # layer-1 heads cannot reach layer-1 receivers


def test_moved_source_takes_z_from_the_other_position(toy):
    model, _, corrupt = toy
    src = trace(model, corrupt.tokens, record=["z"])
    to, frm = corrupt.positions["query_label"], corrupt.positions["random_label"]
    moved = moved_source(src, to, frm)
    rows = torch.arange(len(corrupt))
    for lay in range(model.dims.n_layers):
        z, m = src.value("z", lay), moved.value("z", lay)
        assert torch.equal(m[rows, to], z[rows, frm])
        keep = torch.ones_like(z[..., 0, 0], dtype=torch.bool)
        keep[rows, to] = False
        assert torch.equal(m[keep], z[keep])


def test_result_roundtrip_figure_and_frame(toy, tmp_path):
    model, clean, corrupt = toy
    cfg = GroupSearchConfig(top_k=(1, 1, 1, 1), n_candidates=(3, 2, 2, 2), rank="abs")
    res, _ = find_groups(model, clean, corrupt, cfg)
    back = load_result(res.save(tmp_path / "groups"))
    assert back.groups == res.groups and back.summary() == res.summary()
    fig = res.figure()
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert len(fig.data) == 8  # checked + chosen per group
    frame = res.to_frame()
    assert len(frame) == 3 + 2 + 2 + 2 and frame.chosen.sum() == sum(len(g) for g in res.groups.values())
    heads = res.heads_at()
    assert heads["structure_reader"][0][2] == "prev_query_label" and heads["value_fetcher"][0][2] == "last"


def test_bad_inputs(toy):
    model, clean, corrupt = toy
    with pytest.raises(ConfigError, match="one entry per step"):
        GroupSearchConfig(top_k=(1, 1), n_candidates=(2, 2, 2, 2))
    with pytest.raises(ConfigError, match="top_k <= n_candidates"):
        GroupSearchConfig(top_k=(3, 1, 1, 1), n_candidates=(2, 2, 2, 2))
    with pytest.raises(ConfigError, match="takes no receivers"):
        GroupStep(name="x", position="last", receivers="y", via="logits")
    with pytest.raises(ConfigError, match="not an earlier step"):
        GroupSearchConfig(
            top_k=(1,),
            n_candidates=(1,),
            steps=(GroupStep(name="a", position="last", receivers="b", via="q"),),
        )
    short = clean.select(slice(0, 3))
    with pytest.raises(ShapeError, match="must align"):
        find_groups(model, short, corrupt, GroupSearchConfig(top_k=(1, 1, 1, 1), n_candidates=(1, 1, 1, 1)))
