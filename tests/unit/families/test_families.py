"""Every declared HF family, checked against a tiny random-init model built from the family's own HF config.

A declaration is only paths and a split rule, so each check asks the HF model itself: the generic
run-from-layer gives the HF forward's logits; the declared q/k/v blocks behave as q, k and v do inside the
model's own attention (zeroing k or q makes attention uniform, zeroing one KV head's v silences exactly its
query heads in ``z``); what the declared modules add to the residual is the layer's whole update; a peft
LoRA is followed (the engine runs the peft modules, also on fused projections). Adding a family: one file
in ``tunelens/families/`` and its name in ``NAMES``.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.families.helpers import lora_on_projections
from tests.unit.families.names import NAMES
from tunelens.backends.layerwise import layer_types, run_from_layer
from tunelens.dims import ModelDims
from tunelens.errors import ModelLoadError
from tunelens.families import FAMILIES, family_of_config
from tunelens.models.tiny import TinyConfig, tiny_family

CFG = TinyConfig(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=64)


def _batch(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    if padding == "right":
        mask[1, 6:] = 0
    else:
        mask[1, :2] = 0
    return ids, mask


def _scale(x: torch.Tensor) -> float:
    return float(x.abs().max()) + 1.0


def test_the_list_is_every_declared_family():
    assert sorted(NAMES) == sorted(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_the_declaration_names_the_models_modules(name):
    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=1)
    assert family_of_config(model.config) is fam
    dims = ModelDims.from_hf_config(model.config)
    assert (dims.n_layers, dims.d_model, dims.n_heads, dims.d_head) == (3, 64, 4, 16)
    assert len(fam.layer_modules(model)) == dims.n_layers
    for path in (fam.attention, *fam.qkv, fam.out_proj, fam.mlp, fam.mlp_out_proj, fam.attn_add, fam.mlp_add):
        assert isinstance(fam.module(model, 0, path), torch.nn.Module), path
    rows = fam.qkv_rows(dims)
    widths = {kind: len(index) for kind, (_, index) in rows.items()}
    assert widths == {"q": 64, "k": 16 * dims.n_kv_heads, "v": 16 * dims.n_kv_heads}
    for kind, (path, index) in rows.items():  # the blocks tile their projections' outputs exactly
        assert int(index.max()) < fam.out_features(fam.module(model, 0, path)), kind
    if fam.fused_qkv:
        every = torch.cat([index for _, index in rows.values()]).sort().values
        assert torch.equal(every, torch.arange(fam.out_features(fam.module(model, 0, fam.qkv[0]))))


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", NAMES)
def test_running_from_any_layer_gives_the_hf_logits(name, padding):
    """With a sliding window of 3 on 8-token prompts, so the families' local layers really differ."""
    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=2, sliding_window=3)
    ids, mask = _batch(padding)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        for start in range(CFG.n_layers):
            logits = run_from_layer(model, fam, out.hidden_states[start], start, attention_mask=mask)
            real = mask.bool()  # padded query rows are undefined in HF too
            err = (logits - out.logits)[real].abs().max()
            assert float(err) <= 1e-5 * _scale(out.logits), (start, float(err))
    kinds = layer_types(model.config, CFG.n_layers)
    if name in ("mistral", "phi3", "gemma2", "gemma3_text", "qwen2", "qwen3"):
        assert "sliding_attention" in kinds  # the window is in play for these families
        wide = tiny_family(name, CFG, seed=2, sliding_window=None)
        with torch.no_grad():
            assert (wide(input_ids=ids, attention_mask=mask).logits - out.logits).abs().max() > 1e-3


def _z_and_v(model, fam, dims, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's per-head z (the out-projection's input) and its v (the declared block of the projection)."""
    got = {}
    out_proj = fam.module(model, 0, fam.out_proj)
    v_path, v_rows = fam.qkv_rows(dims)["v"]
    v_module = fam.module(model, 0, v_path)
    hooks = [
        out_proj.register_forward_pre_hook(lambda m, args: got.__setitem__("z", args[0].detach())),
        v_module.register_forward_hook(lambda m, args, out: got.__setitem__("v", out[..., v_rows].detach())),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    b, t = ids.shape
    return got["z"].reshape(b, t, dims.n_heads, dims.d_head), got["v"].reshape(
        b, t, dims.n_kv_heads, dims.d_head
    )


@pytest.mark.parametrize("blank", ["q", "k"])
@pytest.mark.parametrize("name", NAMES)
def test_zeroing_the_declared_q_or_k_block_makes_attention_uniform(name, blank):
    """q = 0 or k = 0 gives every key the same score, so each head's z is the running mean of its KV head's
    v over the real positions so far: a wrong split (or a wrong head order) breaks this."""
    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=3)
    dims = ModelDims.from_hf_config(model.config)
    path, rows = fam.qkv_rows(dims)[blank]
    for layer in range(dims.n_layers):
        fam.zero_outputs(fam.module(model, layer, path), rows)
    ids, mask = _batch("left")
    z, v = _z_and_v(model, fam, dims, ids, mask)
    keep = mask[:, :, None, None].to(v.dtype)
    running = (v * keep).cumsum(1) / keep.cumsum(1).clamp(min=1)  # mean over real positions <= t
    want = running[:, :, [dims.kv_head_of(h) for h in range(dims.n_heads)]]
    real = mask.bool()
    assert float((z - want)[real].abs().max()) <= 1e-5 * _scale(want)
    assert float(v.abs().max()) > 0.1  # v itself is untouched and not trivial


@pytest.mark.parametrize("name", NAMES)
def test_zeroing_one_kv_heads_v_silences_exactly_its_query_heads(name):
    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=4)
    dims = ModelDims.from_hf_config(model.config)
    path, rows = fam.qkv_rows(dims)["v"]
    fam.zero_outputs(fam.module(model, 0, path), rows[: dims.d_head])  # KV head 0
    z, _ = _z_and_v(model, fam, dims, *_batch("right"))
    silent = [h for h in range(dims.n_heads) if dims.kv_head_of(h) == 0]
    assert float(z[:, :, silent].abs().max()) == 0.0
    others = [h for h in range(dims.n_heads) if h not in silent]
    assert all(float(z[:, :, h].abs().max()) > 0.01 for h in others)


@pytest.mark.parametrize("name", NAMES)
def test_the_declared_additions_are_the_layers_whole_update(name):
    """layer output = layer input + what ``attn_add`` and ``mlp_add`` output (Gemma and OLMo-2: the norms
    after the attention and the MLP; GPT-NeoX: both read the layer input, a parallel residual)."""
    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=5)
    got: dict[str, torch.Tensor] = {}

    def keep(key):
        return lambda m, args, out: got.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach())

    layer = fam.layer_modules(model)[1]
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, kw: got.__setitem__("in", args[0]), with_kwargs=True),
        layer.register_forward_hook(keep("out")),
        fam.module(model, 1, fam.attn_add).register_forward_hook(keep("attn")),
        fam.module(model, 1, fam.mlp_add).register_forward_hook(keep("mlp")),
    ]
    try:
        with torch.no_grad():
            model(input_ids=_batch("right")[0], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    total = got["in"] + got["attn"] + got["mlp"]
    assert float((total - got["out"]).abs().max()) <= 1e-5 * _scale(got["out"])
    assert ModelDims.from_hf_config(model.config).parallel_residual == (name == "gpt_neox")


@pytest.mark.parametrize("name", NAMES)
def test_a_lora_on_the_familys_projections_is_followed(name):
    """TransformerBridge ignores a LoRA on fused projections (GPT-2, GPT-NeoX, Phi-3); running the model's
    own (peft-wrapped) modules from a layer gives the peft model's logits, for every family."""
    fam = FAMILIES[name]
    peft_model = lora_on_projections(name, tiny_family(name, CFG, seed=6), seed=6)
    ids, mask = _batch("right")
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        again = run_from_layer(peft_model, fam, out.hidden_states[1], 1, attention_mask=mask)
    assert float((out.logits - plain).abs().max()) > 1e-2  # the adapter changes the answer
    real = mask.bool()
    assert float((again - out.logits)[real].abs().max()) <= 1e-5 * _scale(out.logits)


def test_an_unknown_family_is_refused_naming_the_known_ones():
    from transformers import AutoConfig

    config = AutoConfig.for_model("t5", vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    with pytest.raises(
        ModelLoadError, match=r"unsupported model family 't5'.*llama, mistral.*tunelens/families/"
    ):
        family_of_config(config)


def test_every_declared_family_loads_as_a_model_tunelens_runs():
    from tunelens.models.loaded import LoadedModel, ModelSource
    from tunelens.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    src = ModelSource(kind="memory", location="tiny")
    for name in NAMES:
        module = tiny_family(name, CFG, vocab_size=len(tok.get_vocab()), seed=7)
        loaded = LoadedModel(module, tok, source=src)
        assert loaded.family is FAMILIES[name]
        assert loaded.dims.n_layers == CFG.n_layers
        assert loaded.dims.parallel_residual == (name == "gpt_neox")


@pytest.mark.parametrize("name", NAMES)
def test_the_declared_norms_are_what_attention_and_mlp_read_through(name):
    """The q/k/v projection's input is ``attn_norm``'s output (the layer input itself where the family has no
    pre-norm: OLMo-2), the MLP's input is ``mlp_norm``'s output; the atlas folds these norms' gains in."""
    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=8)
    got: dict[str, torch.Tensor] = {}

    def keep(key, index=0):
        return lambda m, args, *rest: got.__setitem__(
            key, (args[index] if args else rest[0]["hidden_states"])
        )

    layer = fam.layer_modules(model)[1]
    hooks = [
        layer.register_forward_pre_hook(keep("in"), with_kwargs=True),
        fam.module(model, 1, fam.qkv[0]).register_forward_pre_hook(keep("qkv_in")),
        fam.module(model, 1, fam.mlp).register_forward_pre_hook(keep("mlp_in")),
    ]
    for key, path in (("attn_norm", fam.attn_norm), ("mlp_norm", fam.mlp_norm)):
        if path is not None:
            hooks.append(
                fam.module(model, 1, path).register_forward_hook(
                    lambda m, a, out, key=key: got.__setitem__(key, out)
                )
            )
    try:
        with torch.no_grad():
            model(input_ids=_batch("right")[0], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(got["qkv_in"], got["attn_norm"] if fam.attn_norm else got["in"])
    if fam.mlp_norm is not None:
        assert torch.equal(got["mlp_in"], got["mlp_norm"])
    else:  # OLMo-2: the MLP reads the residual after attention directly
        assert (name, fam.attn_norm) == ("olmo2", None)
    gain = fam.norm_gain(model, 1, "q")
    assert (gain is None) == (fam.attn_norm is None)
