"""Mistral: Llama's layout; every layer slides when config.sliding_window is set."""

from dataclasses import replace

from tunelens.families.llama import FAMILY as LLAMA

FAMILY = replace(LLAMA, name="mistral", architectures=("MistralForCausalLM",))
