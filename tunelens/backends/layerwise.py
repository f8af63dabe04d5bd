"""Running an HF decoder from layer ``i`` with the model's own modules, for any declared family.

The engine that starts a patched run at the patched layer needs, per layer, what the HF model's forward
would pass it: the attention mask of the layer's kind (full or sliding window), the rotary embedding of that
kind, and the position ids; after the last layer, the final norm, the unembedding and (Gemma-2/3) the logit
soft-cap. Everything here is computed by transformers' own helpers and modules, so no family's attention,
rope or mask is re-implemented: a family contributes only where its layers and final norm live
(:class:`tunelens.families.Family`).

    >>> import torch
    >>> from tunelens.families import FAMILIES
    >>> fam = FAMILIES["llama"]
    >>> tokens = dataset.encode(model.tokenizer).tokens
    >>> ids, mask = tokens.input_ids[:2], tokens.attention_mask[:2]
    >>> with torch.no_grad():
    ...     out = model.module(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ...     again = run_from_layer(model.module, fam, out.hidden_states[2], 2, attention_mask=mask)
    >>> bool((again - out.logits).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from tunelens.families.base import Family, _get, _unwrap

_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def layer_types(config: Any, n_layers: int) -> list[str]:
    """Each layer's attention kind: ``config.layer_types`` where the family has it (Qwen2/3, Gemma-2/3),
    else every layer slides when ``config.sliding_window`` is set (Mistral, Phi-3), else none does."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)[:n_layers]
    slide = getattr(config, "sliding_window", None)
    return ["sliding_attention" if slide else "full_attention"] * n_layers


def run_from_layer(
    model: nn.Module,
    family: Family,
    hidden: Float[Tensor, "batch pos d_model"],
    start: int,
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    position_ids: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """The logits of ``model`` when layer ``start`` receives ``hidden`` as its input (the residual stream
    before it), computed with the model's own layers, masks, ropes, final norm, unembedding and soft-cap.

    ``position_ids`` default to HF's own default, ``arange(pos)`` for every row (also under left padding).
    """
    lm = _unwrap(model)
    config = lm.config
    base = lm.base_model
    layers = _get(lm, family.layers)
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    pos = position_ids
    kinds = layer_types(config, len(layers))
    needed = sorted(set(kinds[start:]))
    common = {
        "config": config,
        "inputs_embeds": hidden,
        "attention_mask": attention_mask,
        "past_key_values": None,
        "position_ids": pos,
    }
    masks = {kind: _MASKS[kind](**common) for kind in needed}
    rope = getattr(base, "rotary_emb", None)
    ropes: dict[str, Any] = {}
    if rope is not None:
        per_kind = "layer_type" in inspect.signature(rope.forward).parameters
        ropes = {kind: rope(hidden, pos, kind) if per_kind else rope(hidden, pos) for kind in needed}
    h = hidden
    for j in range(start, len(layers)):
        kwargs: dict[str, Any] = {"attention_mask": masks[kinds[j]], "position_ids": pos}
        if rope is not None:
            kwargs["position_embeddings"] = ropes[kinds[j]]
        out = layers[j](h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return unembed(lm, family, h)


def unembed(
    model: nn.Module, family: Family, h: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_vocab"]:
    """What the HF model does after its last layer: the final norm, the unembedding and, in Gemma-2/3, the
    logit soft-cap ``tanh(logits / c) · c`` (applied in ``ForCausalLM.forward``, so not in any module)."""
    lm = _unwrap(model)
    logits = lm.get_output_embeddings()(family.final_norm_module(lm)(h))
    config = getattr(lm.config, "text_config", None) or lm.config
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap is not None else logits
