"""Fine-tuning a causal LM on a task's answers: full or LoRA, seeded, completion-only loss.

Used to build the zoo (tiny models from scratch, SmolLM2 / Gemma fine-tunes) and by users who want a
pair of their own. Loss is the cross-entropy of the answer's first token at each prompt's last position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tunelens.errors import ConfigError
from tunelens.readout import last_logits
from tunelens.tasks.base import Dataset, Encoded

log = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How to fine-tune. ``lora_alpha`` defaults to ``2 * lora_rank`` (the intruder-dimensions paper)."""

    method: Literal["full", "lora"]
    steps: int
    lr: float
    batch_size: int = 16
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ALL_LINEAR
    train_embeddings: bool = False
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora"):
            raise ConfigError(f"method must be 'full' or 'lora', got {self.method!r}")
        if self.steps < 1 or self.batch_size < 1 or self.lora_rank < 1:
            raise ConfigError(
                f"steps, batch_size and lora_rank must be >= 1, got {self.steps}, {self.batch_size}, "
                f"{self.lora_rank}"
            )
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


def answer_loss(model: nn.Module, enc: Encoded) -> torch.Tensor:
    """Mean cross-entropy of the answer token at each prompt's last position."""
    return nn.functional.cross_entropy(last_logits(model, enc.tokens), enc.answer_ids)


def prepare(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """The module to train: a peft LoRA wrapper, or the model itself with embeddings frozen if asked."""
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank,
            target_modules=list(cfg.lora_targets),
            lora_dropout=0.0,
        )
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lora)
    for name, p in model.named_parameters():
        p.requires_grad_(cfg.train_embeddings or not ("embed_tokens" in name or "lm_head" in name))
    return model


def finetune(
    model: nn.Module,
    tokenizer,
    train: Dataset,
    cfg: FinetuneConfig,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train ``model`` (in place for full; wrapped for LoRA) on ``train``; returns it and the loss curve."""
    module = prepare(model, cfg)
    enc = train.encode(tokenizer)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    module.train()
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(len(enc), (min(cfg.batch_size, len(enc)),), generator=gen)
        loss = answer_loss(module, enc.select(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, losses
