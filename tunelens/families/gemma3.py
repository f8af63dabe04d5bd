"""Gemma-3 (text): Gemma-2's layout, with per-head q_norm and k_norm and two ropes (local and global)."""

from dataclasses import replace

from tunelens.families.gemma2 import FAMILY as GEMMA2

FAMILY = replace(GEMMA2, name="gemma3_text", architectures=("Gemma3ForCausalLM",))
