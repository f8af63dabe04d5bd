"""A tiny Gemma-3 pair with every Gemma-specific path switched on, and reference computations on the plain
HF forward (PyTorch hooks on the HF modules, no :mod:`tunelens.backends.stepwise`, no backend).

The toy: a BOS-prepending word-level tokenizer; 3 layers of 4 query heads sharing 1 KV head; layer types
sliding, full, sliding with an 8-token window (shorter than the prompts); q_norm/k_norm; the post-attention
and post-MLP norms; final logit soft-capping at 5 (it bites: random logits exceed it) and an attention
soft-cap set in the config (which HF's Gemma-3 attention does not apply).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.models.tiny import tiny_vocab
from tunelens.tasks.base import Encoded

N_LAYERS = 3


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer, plus a ``<bos>`` prepended to every prompt (as Gemma's does)."""
    vocab = {w: i for i, w in enumerate([*tiny_vocab(), "<bos>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        padding_side="right",
    )


def gemma_module(vocab_size: int, seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=5.0,
        initializer_range=0.15,
        attn_logit_softcapping=2.0,
        pad_token_id=0,
        bos_token_id=vocab_size - 1,
        eos_token_id=2,
        architectures=["Gemma3ForCausalLM"],
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():  # Gemma initialises its norms at gain 1 exactly; give them some structure
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def loaded(module, tok, name: str) -> LoadedModel:
    return LoadedModel(module, tok, source=ModelSource(kind="memory", location=name), name=name)


def perturbed(base: LoadedModel, name: str, select: Callable[[str], bool], scale: float = 0.3, seed: int = 1):
    """A copy of ``base`` whose parameters named by ``select`` moved by Gaussian noise."""
    module = copy.deepcopy(base.module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if select(pname):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return loaded(module, base.tokenizer, name)


def perturbed_pair(base: LoadedModel, select: Callable[[str], bool], name: str) -> ModelPair:
    return ModelPair(base, perturbed(base, name, select), name=name)


# --- reference computations on the HF forward -----------------------------------------------------------


def hf_logits(
    model: LoadedModel,
    tokens: Tensor,
    *,
    z_write: Callable[[int, Tensor], Tensor] | None = None,
    z_read: dict[int, Tensor] | None = None,
    proj: str = "q_proj",
    proj_write: Callable[[int, Tensor], Tensor] | None = None,
    proj_read: dict[int, Tensor] | None = None,
    resid_write: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Logits of the plain HF forward (``batch pos d_vocab``), with per-layer hooks on the o_proj input
    (``z``, ``batch pos head·d_head``), the output of ``proj`` (``q_proj``, ``k_proj`` or ``v_proj``) and
    the decoder layers' input."""
    hf = model.module.base_model.model if hasattr(model.module, "peft_config") else model.module
    handles = []
    for layer, blk in enumerate(hf.model.layers):

        def z_hook(mod, args, layer=layer):
            z = args[0]
            if z_read is not None:
                z_read[layer] = z.detach().clone()
            if z_write is not None:
                return (z_write(layer, z.clone()),)
            return None

        def proj_hook(mod, args, out, layer=layer):
            if proj_read is not None:
                proj_read[layer] = out.detach().clone()
            return None if proj_write is None else proj_write(layer, out.clone())

        def resid_hook(mod, args, kwargs, layer=layer):
            if resid_write is None:
                return None
            return (resid_write(layer, args[0].clone()), *args[1:]), kwargs

        handles.append(blk.self_attn.o_proj.register_forward_pre_hook(z_hook))
        handles.append(getattr(blk.self_attn, proj).register_forward_hook(proj_hook))
        handles.append(blk.register_forward_pre_hook(resid_hook, with_kwargs=True))
    try:
        with model.active(), torch.no_grad():
            return model.module(input_ids=tokens).logits
    finally:
        for h in handles:
            h.remove()


def last_logit_diff(logits: Tensor, data: Encoded, foil: Tensor) -> Tensor:
    """Answer minus foil logit at each prompt's last position."""
    rows = torch.arange(len(foil))
    lg = logits[rows, data.tokens.last]
    return lg[rows, data.answer_ids] - lg[rows, foil]


def best_other(logits: Tensor, data: Encoded) -> Tensor:
    """Answer minus the best other candidate at the last position (the metric without a foil)."""
    rows = torch.arange(len(data.answer_ids))
    lg = logits[rows, data.tokens.last]
    cand = lg.gather(1, data.candidate_ids.clamp(min=0))
    cand = cand.masked_fill((data.candidate_ids < 0) | (data.candidate_ids == data.answer_ids[:, None]), -1e9)
    return lg[rows, data.answer_ids] - cand.amax(dim=1)


def heads(z: Tensor, d_head: int) -> Tensor:
    """``batch pos head·d_head`` -> ``batch pos head d_head``."""
    return z.view(*z.shape[:2], -1, d_head)
