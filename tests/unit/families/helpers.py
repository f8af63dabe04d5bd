"""Set-ups the per-family tests share: a LoRA on a family's projections, a perturbed copy, a saved pair."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tunelens.families import FAMILIES


def lora_on_projections(name: str, model: torch.nn.Module, seed: int, scale: float = 0.3):
    """A peft LoRA (r=2) on the family's q/k/v (fused or not), out-projection and MLP output, with random B so
    that it changes the answer (peft's own init has B = 0)."""
    from peft import LoraConfig, get_peft_model

    fam = FAMILIES[name]
    targets = sorted({p.split(".")[-1] for p in (*fam.qkv, fam.out_proj, fam.mlp_out_proj)})
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, fan_in_fan_out=fam.conv1d))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return peft_model


def perturbed_copy(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """A 'fine-tune': every parameter moved by ``scale`` standard normal noise."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return tuned


def save_pair(tok, root: Path, base: torch.nn.Module, tuned: torch.nn.Module) -> tuple[Path, Path]:
    """Both models saved as HF folders (weights, config, tokenizer) under ``root``: ``base`` and ``tuned``."""
    paths = root / "base", root / "tuned"
    for module, path in zip((base, tuned), paths, strict=True):
        module.save_pretrained(path)
        tok.save_pretrained(path)
    return paths
