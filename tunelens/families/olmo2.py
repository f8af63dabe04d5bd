"""OLMo-2: norms after the attention and the MLP (no pre-norms); its q_norm and k_norm span all heads."""

from dataclasses import replace

from tunelens.families.llama import FAMILY as LLAMA

FAMILY = replace(
    LLAMA,
    name="olmo2",
    architectures=("Olmo2ForCausalLM",),
    attn_add="post_attention_layernorm",
    mlp_add="post_feedforward_layernorm",
    attn_norm=None,
    mlp_norm=None,
)
