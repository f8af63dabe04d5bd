"""The layer-by-layer engine on every declared family, against the plain HF forward with PyTorch hooks that
this test places itself on the family's modules.

Each family's tiny model has a sliding window of 3 on 8-token prompts, so the local layers of Mistral,
Phi-3, Qwen2/3 and Gemma-2/3 really differ from full attention.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.families.helpers import lora_on_projections
from tests.unit.families.names import NAMES
from tunelens.backends.stepwise import LAYER_KINDS, Stepper
from tunelens.dims import ModelDims
from tunelens.errors import ShapeError
from tunelens.families import FAMILIES
from tunelens.models.tiny import TinyConfig, tiny_family

CFG = TinyConfig(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=64)
T = 8


def _ids(rows: int = 2) -> torch.Tensor:
    return torch.randint(3, 128, (rows, T), generator=torch.Generator().manual_seed(0))


def _scale(x: torch.Tensor) -> float:
    return float(x.abs().max()) + 1.0


def _close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    err = float((a - b).abs().max())
    assert err <= 1e-5 * _scale(b), (what, err)


def _model(name: str, seed: int = 1):
    return tiny_family(name, CFG, seed=seed, sliding_window=3).eval()


def _hf_run(model, ids, fam, layer, *, pre=None, post=None, z=None):
    """The plain HF forward, optionally with forward hooks on layer ``layer``'s declared modules: ``post``
    maps a module path to a function of its output, ``z`` replaces the out-projection's input."""
    handles = []
    for path, fn in (post or {}).items():

        def hook(_m, _a, out, fn=fn):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            return fn(out)

        handles.append(fam.module(model, layer, path).register_forward_hook(hook))
    if z is not None:
        out_proj = fam.module(model, layer, fam.out_proj)
        handles.append(out_proj.register_forward_pre_hook(lambda _m, args: (z(args[0]), *args[1:])))
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", NAMES)
def test_the_trace_and_every_partial_run_give_the_hf_logits(name):
    model = _model(name)
    ids = _ids()
    stepper = Stepper(model)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        run = stepper.trace(ids, torch.full((2,), T - 1))
        _close(run.logits, ref[:, -1], "trace")
        for layer in range(CFG.n_layers):
            for start in (0, 1, 4, T - 1):
                h = run.resid[layer][:, start:]
                for j in range(layer, CFG.n_layers):
                    h = stepper.layer(j, h, start=start, past=run.past(j, start))
                _close(stepper.unembed(h), ref[:, start:], f"layer {layer} start {start}")


@pytest.mark.parametrize("name", NAMES)
def test_reading_every_kind_matches_the_hf_modules(name):
    fam = FAMILIES[name]
    model = _model(name, seed=2)
    dims = ModelDims.from_hf_config(model.config)
    ids = _ids()
    stepper = Stepper(model)
    kinds = [k for k in LAYER_KINDS if stepper.available(k)]
    assert ("resid_mid" in kinds) == (name != "gpt_neox")  # GPT-NeoX: a parallel residual
    with torch.no_grad():
        run = stepper.trace(ids, torch.full((2,), T - 1), record=kinds)
    layer = 1
    got: dict[str, torch.Tensor] = {}

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    blk = fam.layer_modules(model)[layer]
    handles = [
        blk.register_forward_pre_hook(lambda m, a, kw: got.__setitem__("resid_pre", a[0]), with_kwargs=True),
        blk.register_forward_hook(lambda m, a, out: got.__setitem__("resid_post", first(out))),
        fam.module(model, layer, fam.out_proj).register_forward_pre_hook(
            lambda m, a: got.__setitem__("z", a[0])
        ),
        fam.module(model, layer, fam.attn_add).register_forward_hook(
            lambda m, a, out: got.__setitem__("attn_out", first(out))
        ),
        fam.module(model, layer, fam.mlp_add).register_forward_hook(
            lambda m, a, out: got.__setitem__("mlp_out", first(out))
        ),
    ]
    for kind, (path, rows) in fam.qkv_rows(dims).items():
        handles.append(
            fam.module(model, layer, path).register_forward_hook(
                lambda m, a, out, kind=kind, rows=rows: got.__setitem__(kind, out[..., rows])
            )
        )
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, output_attentions=False)
    finally:
        for h in handles:
            h.remove()
    for kind in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        _close(run.acts[(layer, kind)], got[kind], kind)
    for kind in ("z", "q", "k", "v"):
        _close(run.acts[(layer, kind)].flatten(2), got[kind], kind)
    if "resid_mid" in kinds:
        _close(run.acts[(layer, "resid_mid")], got["resid_pre"] + got["attn_out"], "resid_mid")
    pattern = run.acts[(layer, "pattern")]  # rows head query key: a causal, windowed distribution
    assert pattern.shape == (2, dims.n_heads, T, T)
    _close(pattern.sum(-1), torch.ones(2, dims.n_heads, T), "pattern rows sum to one")
    assert float(pattern.triu(1).abs().max()) == 0.0
    z = run.acts[(layer, "z")]
    v = run.acts[(layer, "v")]  # v has no rope and no norm in any family: z = pattern @ v per head
    for head in range(dims.n_heads):
        _close(z[:, :, head], pattern[:, head] @ v[:, :, dims.kv_head_of(head)], f"z of head {head}")


@pytest.mark.parametrize("name", NAMES)
def test_writes_match_the_same_edit_made_with_hf_hooks(name):
    fam = FAMILIES[name]
    model = _model(name, seed=3)
    dims = ModelDims.from_hf_config(model.config)
    ids = _ids()
    stepper = Stepper(model)
    layer, head, d = 1, 2, dims.d_head
    delta = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(3))

    def zero_head(z):  # the out-projection's input, (rows, pos, H*D)
        z = z.clone()
        z[..., head * d : (head + 1) * d] = 0
        return z

    def edit(lay, kind, t):
        if lay != layer:
            return None
        if kind == "z":
            t = t.clone()
            t[:, :, head] = 0
            return t
        if kind == "mlp_out":
            return t + delta
        return None

    want = _hf_run(model, ids, fam, layer, z=zero_head, post={fam.mlp_add: lambda o: o + delta})
    with torch.no_grad():
        got = stepper.trace(ids, torch.full((2,), T - 1), hook=edit).logits
    _close(got, want[:, -1], "z and mlp_out")
    if stepper.available("resid_mid"):  # moving resid_mid is moving what attention adds
        want = _hf_run(model, ids, fam, layer, post={fam.attn_add: lambda o: o + delta})
        with torch.no_grad():
            got = stepper.trace(
                ids,
                torch.full((2,), T - 1),
                hook=lambda lay, k, t: t + delta if (lay, k) == (layer, "resid_mid") else None,
            ).logits
        _close(got, want[:, -1], "resid_mid")
    else:
        with pytest.raises(ShapeError, match="resid_mid"):
            stepper.trace(ids, torch.full((2,), T - 1), record=["resid_mid"])


@pytest.mark.parametrize("name", NAMES)
def test_writing_k_or_the_pattern_reaches_the_familys_own_attention(name):
    """k = 0 (the declared block of a fused projection too) gives every allowed key one score: the pattern
    is uniform over the causal window. A pattern written as one-hot on position 0 makes each head's z the
    first position's v."""
    model = _model(name, seed=4)
    dims = ModelDims.from_hf_config(model.config)
    ids = _ids()
    stepper = Stepper(model)
    last = torch.full((2,), T - 1)
    with torch.no_grad():
        run = stepper.trace(
            ids, last, record=["pattern"], hook=lambda lay, k, t: torch.zeros_like(t) if k == "k" else None
        )
    window = 3 if stepper.kinds[0] == "sliding_attention" else T
    q = torch.arange(T)[:, None]
    allowed = (torch.arange(T)[None] <= q) & (torch.arange(T)[None] > q - window)
    uniform = allowed / allowed.sum(-1, keepdim=True)
    _close(run.acts[(0, "pattern")], uniform.expand(2, dims.n_heads, T, T), "uniform pattern")

    def first_only(lay, kind, t):
        if kind != "pattern" or lay != 0:
            return None
        one = torch.zeros_like(t)
        one[..., 0] = 1
        return one

    with torch.no_grad():
        run = stepper.trace(ids, last, record=["z", "v"], hook=first_only)
    z, v = run.acts[(0, "z")], run.acts[(0, "v")]
    for head in range(dims.n_heads):
        _close(z[:, :, head], v[:, :1, dims.kv_head_of(head)].expand(-1, T, -1), f"head {head}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "phi3"])
def test_a_lora_is_followed_also_on_fused_projections(name):
    peft_model = lora_on_projections(name, tiny_family(name, CFG, seed=6), seed=6)
    ids = _ids()
    stepper = Stepper(peft_model)
    with torch.no_grad():
        tuned = peft_model(input_ids=ids, use_cache=False).logits[:, -1]
        _close(stepper.trace(ids, torch.full((2,), T - 1)).logits, tuned, "adapter on")
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids, use_cache=False).logits[:, -1]
            _close(stepper.trace(ids, torch.full((2,), T - 1)).logits, base, "adapter off")
    assert float((tuned - base).abs().max()) > 1e-2


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "gemma3_text"])
def test_no_hook_and_no_attention_switch_survives_a_call_that_raised(name):
    model = _model(name)
    before = model.config._attn_implementation
    stepper = Stepper(model)

    def boom(lay, kind, t):
        if kind == "pattern":
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        stepper.trace(_ids(), torch.full((2,), T - 1), hook=boom)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
    assert model.config._attn_implementation == before


def test_a_start_without_the_keys_before_it_is_refused():
    model = _model("llama")
    stepper = Stepper(model)
    h = torch.zeros(1, 3, CFG.d_model)
    with pytest.raises(ShapeError, match="start=2 needs the keys and values"):
        stepper.layer(0, h, start=2)
