"""GPT-NeoX / Pythia: a fused ``query_key_value`` interleaved per head (``[q_h | k_h | v_h]``), a parallel
residual by default (attention and MLP both read the layer's input), partial rotary."""

from tunelens.families.base import Family

FAMILY = Family(
    name="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    embed="gpt_neox.embed_in",
    attention="attention",
    qkv=("attention.query_key_value",),
    qkv_split="interleaved",
    out_proj="attention.dense",
    mlp="mlp",
    mlp_out_proj="mlp.dense_4h_to_h",
    attn_add="attention",
    mlp_add="mlp",
    gate=None,
    up="mlp.dense_h_to_4h",
)
