"""Both backends against the plain HF forward and against each other, on tiny models."""

import copy

import pytest
import torch

from tests.conftest import ET_PROMPTS
from tunelens.backends.base import add, edit, project, replace
from tunelens.checks import check_sites
from tunelens.errors import BackendError, ShapeError, SiteError
from tunelens.sites import Site, all_layers

BACKENDS = ("bridge", "nnsight")


def _masked_max(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("kind", BACKENDS)
def test_logits_equal_plain_hf_with_padding(arch_model, kind):
    batch = arch_model.encode(ET_PROMPTS)
    assert batch.attention_mask.min() == 0  # the prompts differ in length: padding is exercised
    out = arch_model.backend(kind).run(batch)
    assert _masked_max(out.logits, arch_model.logits(batch), batch.attention_mask) <= 1e-5


def test_backends_read_identical_activations(arch_model):
    batch = arch_model.encode(ET_PROMPTS)
    sites = [
        *check_sites(arch_model),
        Site("z", 1, head=3),
        Site("k", 0, head=arch_model.dims.n_kv_heads - 1),
        Site("pattern", 1, head=2),
    ]
    a = arch_model.backend("bridge").run(batch, reads=sites).acts
    b = arch_model.backend("nnsight").run(batch, reads=sites).acts
    for s in sites:
        assert a[s].shape == s.shape(arch_model.dims, *batch.input_ids.shape) == b[s].shape, s
        assert torch.allclose(a[s], b[s], atol=1e-5), s


def test_residual_sites_are_consistent(arch_model):
    """resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out (independent of hook names);
    a parallel residual (GPT-NeoX) has no resid_mid, and resid_post = resid_pre + attn_out + mlp_out."""
    batch = arch_model.encode(ET_PROMPTS)
    fam, L = arch_model.family, 1
    parallel = arch_model.dims.parallel_residual
    names = ["resid_pre", "attn_out", "mlp_out", "resid_post"] + ([] if parallel else ["resid_mid"])
    acts = arch_model.backend("bridge").run(batch, reads=[Site(n, L) for n in names]).acts
    g = {n: acts[Site(n, L)] for n in names}
    assert torch.allclose(g["resid_pre"] + g["attn_out"] + g["mlp_out"], g["resid_post"], atol=1e-5)
    if not parallel:
        assert torch.allclose(g["resid_pre"] + g["attn_out"], g["resid_mid"], atol=1e-5)
    else:
        with pytest.raises(SiteError, match="parallel residual"):
            arch_model.backend("bridge").run(batch, reads=[Site("resid_mid", L)])
    # z through the family's out-projection (and, in Gemma and OLMo-2, the norm after it) is attn_out
    z = arch_model.backend("bridge").run(batch, reads=[Site("z", L)]).acts[Site("z", L)]
    with torch.no_grad():
        out = fam.module(arch_model.hf, L, fam.out_proj)(z.flatten(-2))
        if fam.attn_add != fam.attention:
            out = fam.module(arch_model.hf, L, fam.attn_add)(out)
    assert torch.allclose(out, g["attn_out"], atol=1e-5)


def _writes(dims, last):
    d = dims.d_model
    u = torch.nn.functional.normalize(torch.randn(d, 1, generator=torch.Generator().manual_seed(0)), dim=0)
    return [
        replace(Site("resid_post", 0), torch.zeros(d), positions=last),
        replace(Site("resid_mid", 1), torch.linspace(-1, 1, d), positions=2),  # not constant: LayerNorm
        add(Site("attn_out", 0), torch.linspace(0, 1, d)),  # not constant: LayerNorm drops a mean shift
        add(Site("z", 1, head=2), torch.ones(dims.d_head)),
        project(Site("resid_pre", 1), u, coords=torch.tensor([3.0]), positions=last),
        project(Site("resid_post", 1), u),  # ablation
        edit(
            Site("v", 0), lambda a: a + 0.5
        ),  # not 2 * a: a norm after attention (Gemma, OLMo-2) undoes a scale
        replace(Site("k", 1, head=dims.n_kv_heads - 1), torch.zeros(dims.d_head), positions=3),
        edit(Site("q", 1, head=0), lambda a: -a),
        add(Site("mlp_out", 0), torch.linspace(-0.5, 0, d)),
    ]


@pytest.mark.parametrize("i", range(10))
def test_every_write_agrees_across_backends_and_changes_the_output(arch_model, i):
    batch = arch_model.encode(ET_PROMPTS)
    w = _writes(arch_model.dims, batch.last)[i]
    if w.site.kind == "resid_mid" and arch_model.dims.parallel_residual:
        pytest.skip(
            "a parallel residual has no resid_mid (test_residual_sites_are_consistent checks the refusal)"
        )
    clean = arch_model.backend("bridge").run(batch).logits
    a = arch_model.backend("bridge").run(batch, writes=[w]).logits
    b = arch_model.backend("nnsight").run(batch, writes=[w]).logits
    assert _masked_max(a, b, batch.attention_mask) <= 1e-5
    assert (a - clean).abs().max() > 1e-4, "the write had no effect"


@pytest.mark.parametrize("kind", BACKENDS)
def test_patching_with_own_activations_is_a_noop(arch_model, kind):
    batch = arch_model.encode(ET_PROMPTS)
    backend = arch_model.backend(kind)
    sites = [s for s in check_sites(arch_model) if s.kind != "pattern" or kind == "bridge"]
    clean = backend.run(batch, reads=sites)
    patched = backend.run(batch, writes=[replace(s, clean.acts[s]) for s in sites])
    assert torch.equal(patched.logits, clean.logits)


def test_replace_value_matches_a_manual_residual_edit(tiny_model):
    """Replacing resid_post at layer 0 equals running layer 1.. by hand on the edited residual."""
    batch = tiny_model.encode(ET_PROMPTS[:1])
    new = torch.randn(tiny_model.dims.d_model, generator=torch.Generator().manual_seed(5))
    out = tiny_model.backend("bridge").run(batch, writes=[replace(Site("resid_post", 0), new, positions=4)])
    hf = tiny_model.hf
    with torch.no_grad():
        h = hf(input_ids=batch.input_ids, output_hidden_states=True).hidden_states[1].clone()
        h[:, 4] = new
        pos = torch.arange(h.shape[1])[None]
        emb = hf.model.rotary_emb(h, pos)
        mask = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1)[None, None]
        for layer in hf.model.layers[1:]:
            h = layer(h, attention_mask=mask, position_embeddings=emb, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        manual = hf.lm_head(hf.model.norm(h))
    assert torch.allclose(out.logits, manual, atol=1e-4)


@pytest.mark.parametrize("kind", BACKENDS)
def test_gradients_reach_read_activations_and_write_values(tiny_model, kind):
    batch = tiny_model.encode(ET_PROMPTS)
    backend = tiny_model.backend(kind)
    steer = torch.zeros(tiny_model.dims.d_model, requires_grad=True)
    out = backend.run(batch, reads=[Site("z", 0)], writes=[add(Site("resid_post", 0), steer)], grad=True)
    metric = out.logits[:, -1, 5].sum()
    g_z, g_steer = torch.autograd.grad(metric, [out.acts[Site("z", 0)], steer])
    assert g_z.abs().sum() > 0 and g_steer.abs().sum() > 0


def test_gradients_agree_across_backends(arch_model):
    batch = arch_model.encode(ET_PROMPTS)
    grads = []
    mid = Site("attn_out" if arch_model.dims.parallel_residual else "resid_mid", 1)
    for kind in BACKENDS:
        out = arch_model.backend(kind).run(batch, reads=[mid, Site("z", 1)], grad=True)
        m = out.logits[torch.arange(3), batch.last, 7].sum()
        grads.append(torch.autograd.grad(m, [out.acts[mid], out.acts[Site("z", 1)]]))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind", BACKENDS)
def test_no_hook_survives_any_call_including_one_that_raised(arch_model, kind):
    backend = arch_model.backend(kind)
    batch = arch_model.encode(ET_PROMPTS)
    backend.run(batch, reads=all_layers(arch_model.dims, "z"))
    assert backend.attached_hooks() == 0

    def boom(a):
        raise RuntimeError("failure inside a hook")

    with pytest.raises((RuntimeError, BackendError)):
        backend.run(batch, writes=[edit(Site("resid_post", 0), boom)])
    assert backend.attached_hooks() == 0
    with pytest.raises(ShapeError):
        backend.run(batch, writes=[replace(Site("resid_post", 1), torch.zeros(3))])
    with pytest.raises(SiteError):
        backend.run(batch, reads=[Site("z", 7)])
    assert backend.attached_hooks() == 0
    # and the model still works, identically
    assert torch.allclose(backend.run(batch).logits, arch_model.logits(batch), atol=1e-5)


def test_nnsight_refuses_pattern_writes_clearly(tiny_model):
    batch = tiny_model.encode(ET_PROMPTS)
    with pytest.raises(BackendError, match="cannot write 'pattern'"):
        tiny_model.backend("nnsight").run(batch, writes=[edit(Site("pattern", 0), lambda a: a)])
    out = tiny_model.backend("bridge").run(batch, writes=[edit(Site("pattern", 0), lambda a: a * 0.5)])
    assert (out.logits - tiny_model.logits(batch)).abs().max() > 1e-4


def test_nan_in_a_write_value_is_refused(tiny_model):
    batch = tiny_model.encode(ET_PROMPTS)
    value = torch.zeros(tiny_model.dims.d_model)
    value[3] = float("nan")
    with pytest.raises(ShapeError, match="non-finite"):
        tiny_model.backend("bridge").run(batch, writes=[replace(Site("resid_post", 0), value)])


@pytest.mark.parametrize("kind", BACKENDS)
def test_lora_switch_pair_views(tiny_lora_pair, kind):
    """Adapter off = the plain base model; adapter on = the merged model; both backends agree."""
    from peft import PeftModel

    base, tuned = tiny_lora_pair.base, tiny_lora_pair.tuned
    batch = base.encode(ET_PROMPTS)
    peft_model = tuned.module
    assert isinstance(peft_model, PeftModel)
    with peft_model.disable_adapter():
        want_base = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want_tuned = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (want_base - want_tuned).abs().max() > 1e-3
    got_base = base.backend(kind).run(batch).logits
    got_tuned = tuned.backend(kind).run(batch).logits
    assert _masked_max(got_base, want_base, batch.attention_mask) <= 1e-5
    assert _masked_max(got_tuned, want_tuned, batch.attention_mask) <= 1e-5
    assert base.content_hash != tuned.content_hash


def test_reads_without_logits_stop_early_and_agree(arch_model):
    batch = arch_model.encode(ET_PROMPTS)
    sites = [Site("resid_post", 0), Site("z", 0)]
    full = arch_model.backend("bridge").run(batch, reads=sites)
    early = arch_model.backend("bridge").run(batch, reads=sites, logits=False)
    assert early.logits is None
    for s in sites:
        assert torch.equal(full.acts[s], early.acts[s])
    assert arch_model.backend("bridge").attached_hooks() == 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "olmo2", "gpt2", "gpt_neox", "phi3"])
def test_a_lora_pair_of_every_family_is_followed_or_refused_never_wrong(family, tiny_tok, tmp_path):
    """A LoRA on q/k/v (fused where the family fuses them), the out-projection and the MLP's output. The
    bridge rebuilds GPT-2, GPT-NeoX and Phi-3 attention from weights sliced at boot and would ignore the
    adapter: it must refuse; nnsight runs the peft modules and must give the peft model's logits."""
    from peft import LoraConfig, get_peft_model

    from tunelens.families import FAMILIES
    from tunelens.models.loaded import LoadedModel, ModelSource
    from tunelens.models.loading import load_adapter_pair
    from tunelens.models.tiny import TinyConfig, tiny_family

    fam = FAMILIES[family]
    module = tiny_family(family, TinyConfig(n_layers=2), len(tiny_tok.get_vocab()), seed=0)
    base = LoadedModel(module, tiny_tok, source=ModelSource(kind="memory", location=family), name=family)
    targets = sorted({p.split(".")[-1] for p in (*fam.qkv, fam.out_proj, fam.mlp_out_proj)})
    peft_model = get_peft_model(
        copy.deepcopy(module),
        LoraConfig(r=2, target_modules=targets, fan_in_fan_out=fam.conv1d, init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path)
    pair = load_adapter_pair(base, tmp_path, mode="switch")
    batch = base.encode(ET_PROMPTS)
    with torch.no_grad():
        want = pair.tuned.logits(batch)
        plain = pair.base.logits(batch)
    assert _masked_max(want, plain, batch.attention_mask) > 1e-2  # the adapter changes the answer
    got = pair.tuned.backend("nnsight").run(batch).logits
    assert _masked_max(got, want, batch.attention_mask) <= 1e-4 * (float(want.abs().max()) + 1)
    if family in ("gpt2", "gpt_neox", "phi3"):
        with pytest.raises(
            BackendError, match=r"TransformerBridge does not follow this .*use backend='nnsight'"
        ):
            pair.tuned.backend("bridge")
    else:
        got = pair.tuned.backend("bridge").run(batch).logits
        assert _masked_max(got, want, batch.attention_mask) <= 1e-4 * (float(want.abs().max()) + 1)
    assert _masked_max(pair.base.backend("bridge").run(batch).logits, plain, batch.attention_mask) <= 1e-4
