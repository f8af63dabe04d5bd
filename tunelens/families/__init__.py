"""The HF decoder families tunelens knows, one small declaration each (:class:`Family`).

Adding a family: a file here declaring ``FAMILY`` (paths of its layers, q/k/v or fused qkv and how it
splits, output projection, MLP, what the residual receives), one line in :data:`FAMILIES` below, and the
family's name in the tests' list (``tests/unit/families/names.py``), which checks the declaration
against a tiny random-init model built from the family's HF config.

    >>> family_of_config(type("Cfg", (), {"model_type": "qwen2", "architectures": None})()).qkv[0]
    'self_attn.q_proj'
"""

from __future__ import annotations

from typing import Any

from tunelens.errors import ModelLoadError
from tunelens.families import gemma2, gemma3, gpt2, gpt_neox, llama, mistral, olmo2, phi3, qwen2, qwen3
from tunelens.families.base import Family, _unwrap

FAMILIES: dict[str, Family] = {
    m.FAMILY.name: m.FAMILY
    for m in (llama, mistral, qwen2, qwen3, gemma2, gemma3, gpt2, gpt_neox, phi3, olmo2)
}
BY_ARCHITECTURE: dict[str, Family] = {a: f for f in FAMILIES.values() for a in f.architectures}


def family_of(model: Any) -> Family:
    """The family of a model: a ``*ForCausalLM``, a peft model wrapping one, or Gemma-3's multimodal wrapper
    (whose text model is what tunelens runs)."""
    config = _unwrap(model).config
    return family_of_config(getattr(config, "text_config", None) or config)


def family_of_config(config: Any) -> Family:
    """The family of an HF config (by its architecture, else its ``model_type``), or an error naming the
    supported families and where to add one."""
    for arch in getattr(config, "architectures", None) or ():
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch]
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    archs = ", ".join(getattr(config, "architectures", None) or ()) or "none"
    raise ModelLoadError(
        f"unsupported model family {model_type!r} (architectures: {archs}); tunelens knows "
        f"{', '.join(FAMILIES)}: a decoder-only family is added by a small declaration in "
        "tunelens/families/ (see its __init__)"
    )


__all__ = ["BY_ARCHITECTURE", "FAMILIES", "Family", "family_of", "family_of_config"]
