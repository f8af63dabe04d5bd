"""Gemma-2: Llama's paths, with norms after the attention and the MLP (what the residual receives is their
output), scaled and tied embeddings, logit and attention soft-capping, alternating sliding windows."""

from dataclasses import replace

from tunelens.families.llama import FAMILY as LLAMA

FAMILY = replace(
    LLAMA,
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    attn_add="post_attention_layernorm",
    mlp_add="post_feedforward_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    norm_offset=1.0,
)
