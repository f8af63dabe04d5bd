"""Qwen3: Llama's layout, with per-head q_norm and k_norm inside the attention."""

from dataclasses import replace

from tunelens.families.llama import FAMILY as LLAMA

FAMILY = replace(LLAMA, name="qwen3", architectures=("Qwen3ForCausalLM",))
