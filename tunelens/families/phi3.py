"""Phi-3: one fused ``qkv_proj`` (``[Q | K | V]``) and a fused ``gate_up_proj`` (gate first)."""

from dataclasses import replace

from tunelens.families.llama import FAMILY as LLAMA

FAMILY = replace(
    LLAMA,
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    qkv=("self_attn.qkv_proj",),
    gate="mlp.gate_up_proj",
    up="mlp.gate_up_proj",
)
