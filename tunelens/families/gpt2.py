"""GPT-2: Conv1D projections stored (in, out), a fused ``c_attn`` (``[Q | K | V]``), learned positions
(already in the first layer's input), LayerNorm, tied embeddings."""

from tunelens.families.base import Family

FAMILY = Family(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    layers="transformer.h",
    final_norm="transformer.ln_f",
    embed="transformer.wte",
    attention="attn",
    qkv=("attn.c_attn",),
    out_proj="attn.c_proj",
    mlp="mlp",
    mlp_out_proj="mlp.c_proj",
    attn_add="attn",
    mlp_add="mlp",
    gate=None,
    up="mlp.c_fc",
    positions="transformer.wpe",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    conv1d=True,
)
