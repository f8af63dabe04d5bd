"""Qwen2 / Qwen2.5: Llama's layout, with biases on q, k and v."""

from dataclasses import replace

from tunelens.families.llama import FAMILY as LLAMA

FAMILY = replace(LLAMA, name="qwen2", architectures=("Qwen2ForCausalLM",))
