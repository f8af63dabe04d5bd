"""The circuits engine on the Gemma-3 layout, against the plain HF forward with PyTorch hooks.

Gemma-specific paths: a BOS token before every prompt (positions shift by one, answer ids do not), four
query heads on one KV head, sliding-window and full layers mixed, q_norm/k_norm and the post norms, final
logit soft-capping, and a LoRA adapter switched on and off (the zoo's ``gemma3-et`` pair).
"""

from __future__ import annotations

import copy

import pytest
import torch

from circuits.circuit.faithfulness import faithfulness
from circuits.patching.attribution import attribute
from circuits.patching.cmap import cmap_groups, cmap_sweep, trace_pair
from circuits.patching.engine import Patch, run_cells, trace
from circuits.patching.metrics import Answers, logit_diff
from circuits.patching.path_patching import path_patching
from tests.unit.circuits import gemma_toy as toy
from tunelens.models.tiny import tiny_tokenizer
from tunelens.sites import Site
from tunelens.tasks import entity_tracking as et

TOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return toy.bos_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    return toy.loaded(toy.gemma_module(len(tok.get_vocab()), seed=0), tok, "gemma-toy-base")


@pytest.fixture(scope="module")
def tuned(base):
    return toy.perturbed(base, "gemma-toy-tuned", lambda name: "layers" in name, scale=0.2)


@pytest.fixture(scope="module")
def lora_pair(base, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from tunelens.models.loading import load_adapter_pair

    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        copy.deepcopy(base.module),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
    )
    folder = tmp_path_factory.mktemp("gemma-adapter")
    peft_model.save_pretrained(folder)
    return load_adapter_pair(base, folder, mode="switch")


@pytest.fixture(scope="module")
def clean_ds():
    return et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=2), seed=0)


@pytest.fixture(scope="module")
def data(clean_ds, tok):
    return clean_ds.encode(tok)


@pytest.fixture(scope="module")
def corrupt(clean_ds, tok):
    return et.counterfactuals(clean_ds, "query", seed=1).encode(tok)


def _z_writer(cells_src: dict[int, list[tuple[int, torch.Tensor]]], d_head: int):
    """A z hook writing ``src[layer][rows, pos, head]`` at each (head, per-prompt positions) of a layer."""

    def write(layer, z):
        if layer not in cells_src:
            return z
        zh = toy.heads(z, d_head)
        for head, pos, src in cells_src[layer]:
            rows = torch.arange(len(pos))
            zh[rows, pos, head] = toy.heads(src, d_head)[rows, pos, head]
        return zh.reshape(z.shape)

    return write


def test_the_bos_shifts_every_position_by_one_and_no_answer_id(clean_ds, data):
    plain = clean_ds.encode(tiny_tokenizer())
    bos = data.tokens.input_ids[0, 0]
    assert (data.tokens.input_ids[:, 0] == bos).all()
    assert torch.equal(data.tokens.input_ids[:, 1:], plain.tokens.input_ids)
    assert torch.equal(data.answer_ids, plain.answer_ids)
    assert torch.equal(data.candidate_ids, plain.candidate_ids)
    for name, pos in plain.positions.items():
        assert torch.equal(data.positions[name], pos + 1), name


@pytest.mark.parametrize("which", ["plain", "lora-on", "lora-off"])
def test_stepper_logits_equal_the_hf_forward(base, lora_pair, data, which):
    """Soft-capping, sliding window (8 < prompt length), q/k norms, post norms, BOS; peft adapter too."""
    model = {"plain": base, "lora-on": lora_pair.tuned, "lora-off": lora_pair.base}[which]
    run = trace(model, data.tokens)
    ref = toy.hf_logits(model, data.tokens.input_ids)
    rows = torch.arange(len(data.answer_ids))
    ref_last = ref[rows, data.tokens.last]
    assert ref_last.abs().max() <= 5.0  # the final soft-cap (5) is active ...
    assert ref_last.abs().max() > 3.0  # ... and bites (tanh(x/5)·5 < 0.9·x beyond 2.8)
    assert (run.trace.logits - ref_last).abs().max() <= TOL
    if which == "lora-on":
        off = toy.hf_logits(lora_pair.base, data.tokens.input_ids)[rows, data.tokens.last]
        assert (off - ref_last).abs().max() > 0.05  # the adapter matters


def test_fast_sweep_equals_one_hooked_hf_forward_per_cell(base, data, corrupt):
    d = base.dims.d_head
    answers = Answers.from_encoded(data, foil=corrupt)
    source = trace(base, data.tokens, record=["z"])
    target = trace(base, corrupt.tokens)
    ql, last = data.positions["query_label"], data.positions["last"]
    cells = []
    for layer in range(toy.N_LAYERS):
        cells += [(Patch(Site("resid_pre", layer), int(p)),) for p in (0, 1, 6, int(ql[0]), int(last[0]))]
        cells += [(Patch(Site("z", layer, h), pos.clone()),) for pos in (ql, last) for h in range(4)]
    cells.append(
        (Patch(Site("z", 0, 1), ql.clone()), Patch(Site("z", 2, 3), last.clone()))
    )  # a two-patch cell
    ours = logit_diff(run_cells(target, source, cells, answers, max_rows=20))

    src_z: dict[int, torch.Tensor] = {}
    src_resid: list[torch.Tensor] = []
    toy.hf_logits(
        base, data.tokens.input_ids, z_read=src_z, resid_write=lambda lay, h: src_resid.append(h) or h
    )
    ref = []
    for cell in cells:
        plan: dict[int, list] = {}
        resid_plan: dict[int, int] = {}
        for p in cell:
            if p.kind == "z":
                plan.setdefault(p.layer, []).append((p.head, p.position, src_z[p.layer]))
            else:
                resid_plan[p.layer] = p.position

        def resid_write(layer, h, resid_plan=resid_plan):
            if layer in resid_plan:
                h[:, resid_plan[layer]] = src_resid[layer][:, resid_plan[layer]]
            return h

        logits = toy.hf_logits(
            base, corrupt.tokens.input_ids, z_write=_z_writer(plan, d), resid_write=resid_write
        )
        ref.append(toy.last_logit_diff(logits, data, corrupt.answer_ids))
    ref = torch.stack(ref)
    assert ref.std() > 0.01  # the cells have different effects
    assert (ours - ref).abs().max() <= TOL


@pytest.mark.parametrize("pair_kind", ["same", "lora-same"])
def test_cmap_with_base_equal_to_tuned_changes_nothing(base, lora_pair, data, pair_kind):
    pair = (base, base) if pair_kind == "same" else (lora_pair.tuned, lora_pair.tuned)
    runs = trace_pair(pair, data)
    for direction in ("tuned -> base", "base -> tuned"):
        for position in ("last", "query_label"):
            sweep = cmap_sweep(pair, data, position=position, direction=direction, runs=runs)
            assert (sweep.values["logit_diff"] - sweep.target["logit_diff"]).abs().max() <= 1e-5
    res = cmap_groups(
        pair, data, {"g": [(0, 1, "query_label"), (2, 3, "last"), (1, 0, "all")]}, n_random=2, runs=runs
    )
    assert (res.table.logit_diff - res.base["logit_diff"]).abs().max() <= 1e-5


@pytest.mark.parametrize("pair_kind", ["perturbed", "lora"])
def test_cmap_sweep_equals_one_hooked_hf_forward_per_head(base, tuned, lora_pair, data, pair_kind):
    b, t = (base, tuned) if pair_kind == "perturbed" else (lora_pair.base, lora_pair.tuned)
    d = b.dims.d_head
    pos = data.positions["query_label"]
    sweep = cmap_sweep((b, t), data, position="query_label")
    tuned_z: dict[int, torch.Tensor] = {}
    toy.hf_logits(t, data.tokens.input_ids, z_read=tuned_z)
    ref = torch.zeros(toy.N_LAYERS, 4)
    for layer in range(toy.N_LAYERS):
        for h in range(4):
            logits = toy.hf_logits(
                b, data.tokens.input_ids, z_write=_z_writer({layer: [(h, pos, tuned_z[layer])]}, d)
            )
            ref[layer, h] = toy.best_other(logits, data).mean()
    assert (ref - ref.mean()).abs().max() > 1e-3
    assert (sweep.values["logit_diff"] - ref).abs().max() <= TOL


def _edited(base, edit, name):
    module = copy.deepcopy(base.module)
    with torch.no_grad():
        edit(module.model.layers[-1].self_attn, base.dims.d_head)
    return toy.loaded(module, base.tokenizer, name)


def _effect(pair, data):
    sweep = cmap_sweep(pair, data, position="last")
    return sweep.values["logit_diff"] - sweep.target["logit_diff"]


def test_cmap_known_answers_on_the_last_layer(base, data):
    """o_proj: exactly 0 (z is taken before it). One query head's q_proj rows: that head alone. The one
    KV head's v_proj: every query head (all four share it)."""
    gen = torch.Generator().manual_seed(0)

    def o_edit(attn, d):
        attn.o_proj.weight.mul_(3.0).add_(0.5)

    def q_edit(attn, d):
        w = attn.q_proj.weight[2 * d : 3 * d]
        w.add_(torch.randn(w.shape, generator=gen))

    def v_edit(attn, d):
        attn.v_proj.weight.add_(torch.randn(attn.v_proj.weight.shape, generator=gen))

    o_pair = (base, _edited(base, o_edit, "o"))
    assert (
        toy.hf_logits(o_pair[0], data.tokens.input_ids) - toy.hf_logits(o_pair[1], data.tokens.input_ids)
    ).abs().max() > 0.1
    assert _effect(o_pair, data).abs().max() <= 1e-5
    eff = _effect((base, _edited(base, q_edit, "q")), data)
    assert eff[:-1].abs().max() <= 1e-5
    assert eff[-1, [0, 1, 3]].abs().max() <= 1e-5
    assert eff[-1, 2].abs() > 1e-3
    eff = _effect((base, _edited(base, v_edit, "v")), data)
    assert eff[:-1].abs().max() <= 1e-5
    assert eff[-1].abs().min() > 1e-3


def test_attribution_of_z_is_the_hf_gradient_times_the_difference(base, tuned, data):
    runs = trace_pair((base, tuned), data)
    est = attribute(runs.base, runs.tuned, runs.answers, "z")  # layer batch pos head
    d = base.dims.d_head
    tuned_z: dict[int, torch.Tensor] = {}
    toy.hf_logits(tuned, data.tokens.input_ids, z_read=tuned_z)
    probes: dict[int, torch.Tensor] = {}
    acts: dict[int, torch.Tensor] = {}

    def z_hook(mod, args, layer):  # z + a zero leaf: its gradient is d metric / d z, graph intact
        probes[layer] = torch.zeros_like(args[0], requires_grad=True)
        acts[layer] = args[0].detach()
        return (args[0] + probes[layer],)

    handles = [
        blk.self_attn.o_proj.register_forward_pre_hook(lambda m, a, layer=i: z_hook(m, a, layer))
        for i, blk in enumerate(base.module.model.layers)
    ]
    try:
        logits = base.module(input_ids=data.tokens.input_ids).logits
    finally:
        for h in handles:
            h.remove()
    toy.best_other(logits, data).mean().backward()
    for layer in range(toy.N_LAYERS):
        grad = toy.heads(probes[layer].grad, d)
        diff = toy.heads(tuned_z[layer] - acts[layer], d)
        ref = (grad * diff).sum(-1) * len(data.answer_ids)
        assert (est[layer] - ref).abs().max() <= TOL
    assert est.abs().max() > 1e-3


@pytest.mark.parametrize(
    ("via", "s_name", "r_name", "receivers"),
    [
        ("q", "last", "last", [(2, 1), (2, 2)]),  # query heads
        ("k", "query_label", "query_label", [(2, 3)]),  # the one KV head: every query head's keys
        ("v", "query_label", "query_label", [(2, 0)]),
    ],
)
def test_path_patching_equals_the_two_step_hf_run(base, data, corrupt, via, s_name, r_name, receivers):
    d = base.dims.d_head
    answers = Answers.from_encoded(data, foil=corrupt)
    source = trace(base, data.tokens, record=["z"])
    target = trace(base, corrupt.tokens, record=["z"])
    s_pos, r_pos = data.positions[s_name], data.positions[r_name]
    senders = [(0, 0), (0, 3), (1, 2)]
    res = path_patching(
        target, source, answers, senders=senders, receivers=receivers, via=via, sender_pos=s_pos,
        receiver_pos=r_pos,
    )  # fmt: skip
    direct = path_patching(target, source, answers, senders=senders, via="logits", sender_pos=s_pos)
    units = [h for _, h in receivers] if via == "q" else [0]  # k/v: the KV head (only one here)
    assert res.units == [[2, u] for u in units]
    src_z, tgt_z = {}, {}
    toy.hf_logits(base, data.tokens.input_ids, z_read=src_z)
    toy.hf_logits(base, corrupt.tokens.input_ids, z_read=tgt_z)
    rows = torch.arange(len(s_pos))
    proj = f"{via}_proj"
    for i, (s_layer, s_head) in enumerate(senders):

        def step1(layer, z, s_layer=s_layer, s_head=s_head):
            if layer == s_layer:
                return _z_writer({layer: [(s_head, s_pos, src_z[layer])]}, d)(layer, z)
            return tgt_z[layer].clone() if layer > s_layer else z

        seen: dict[int, torch.Tensor] = {}
        logits1 = toy.hf_logits(base, corrupt.tokens.input_ids, z_write=step1, proj=proj, proj_read=seen)
        ref_direct = toy.last_logit_diff(logits1, data, corrupt.answer_ids).mean()
        assert abs(float(direct.values["logit_diff"][i]) - float(ref_direct)) <= TOL

        def step2(layer, out, seen=seen):
            if layer != 2:
                return out
            oh, rec = toy.heads(out, d), toy.heads(seen[layer], d)
            for u in units:
                oh[rows, r_pos, u] = rec[rows, r_pos, u]
            return oh.reshape(out.shape)

        logits2 = toy.hf_logits(base, corrupt.tokens.input_ids, proj=proj, proj_write=step2)
        ref = toy.last_logit_diff(logits2, data, corrupt.answer_ids).mean()
        assert abs(float(res.values["logit_diff"][i]) - float(ref)) <= TOL
    assert res.effect().abs().max() > 1e-3
    if s_name == "last":  # from query_label, the direct path never reaches the last position
        assert direct.effect().abs().max() > 1e-3


def test_faithfulness_equals_an_independent_hf_mean_ablation(base, data, tok):
    reference = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=3), seed=7).encode(tok)
    groups = {"a": [(2, 1, "last"), (1, 3, "query_label")], "b": [(0, 2, "all")]}
    res = faithfulness(base, data, groups, reference=reference, n_random=0)
    d = base.dims.d_head
    ref_z: dict[int, torch.Tensor] = {}
    toy.hf_logits(base, reference.tokens.input_ids, z_read=ref_z)
    n, n_pos = data.tokens.input_ids.shape
    rows, ref_rows = torch.arange(n), torch.arange(len(reference.answer_ids))
    assert reference.tokens.input_ids.shape[1] == n_pos and bool(reference.tokens.attention_mask.all())

    def ablate(layer, z):
        means = ref_z[layer].mean(0, keepdim=True).repeat(n, 1, 1)  # per-position mean over the reference
        for name, pos in data.positions.items():  # a named position: the mean at the same named position
            means[rows, pos] = ref_z[layer][ref_rows, reference.positions[name]].mean(0)
        keep = torch.zeros(n, n_pos, 4, dtype=torch.bool)
        for lay, h, p in [x for g in groups.values() for x in g]:
            if lay == layer:
                if p == "all":
                    keep[:, :, h] = True
                else:
                    keep[rows, data.positions[p], h] = True
        keep = keep.repeat_interleave(d, dim=2)
        return torch.where(keep, z, means)

    logits = toy.hf_logits(base, data.tokens.input_ids, z_write=ablate)
    last = logits[rows, data.tokens.last]
    cand = last.gather(1, data.candidate_ids)
    acc = (cand.amax(1) <= last[rows, data.answer_ids]).float().mean()
    assert abs(res.acc_circuit - float(acc)) <= 1e-6
    assert abs(res.logit_diff_circuit - float(toy.best_other(logits, data).mean())) <= TOL
    full = toy.hf_logits(base, data.tokens.input_ids)
    assert abs(res.logit_diff_full - float(toy.best_other(full, data).mean())) <= TOL
    assert abs(res.logit_diff_circuit - res.logit_diff_full) > 1e-3  # the ablation did something
