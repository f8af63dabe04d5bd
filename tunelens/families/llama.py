"""Llama (and SmolLM2): separate q/k/v projections, a pre-norm residual. The template of the llama-likes."""

from tunelens.families.base import Family

FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    layers="model.layers",
    final_norm="model.norm",
    embed="model.embed_tokens",
    attention="self_attn",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_out_proj="mlp.down_proj",
    attn_add="self_attn",
    mlp_add="mlp",
)
