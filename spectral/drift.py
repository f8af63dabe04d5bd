"""General text that is not fine-tuning data: the base model's own samples from diverse prompts.

The loss of a (modified) tuned model on these samples measures its drift from the base distribution, the
"forgetting" axis of the intruder intervention (spec §4.3 plot 5). The prompts span stories, science,
code, recipes, history, dialogue and lists; continuations are sampled from the *base* model (temperature 1,
seeded), so the text is what the base model itself considers likely, with no task data in it.

Example (``pair``: a base and its fine-tune, untrained tiny Llamas with a vocabulary of 89 words):
    >>> import math
    >>> text = base_samples(pair.base, GeneralTextConfig(n_prompts=4, new_tokens=16))
    >>> len(text.texts), int(text.score_mask.sum(dim=1).max())  # up to 16 sampled tokens per prompt
    (4, 16)
    >>> loss = continuation_loss(pair.tuned.module, text)  # nats per sampled token
    >>> abs(loss - math.log(pair.dims.d_vocab)) < 0.5  # untrained: about as unsure as a uniform guess
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tunelens.errors import ConfigError
from tunelens.models.loaded import LoadedModel

PROMPTS: tuple[str, ...] = (
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which",
    "def fibonacci(n):\n    ",
    "To make a simple tomato soup, you will need",
    "The Roman Empire reached its greatest extent",
    "Dear Sarah,\nThank you so much for",
    "The three most important things to remember when learning a language are",
    "In economics, inflation refers to",
    "Q: Why is the sky blue?\nA:",
    "The football match ended in a draw after",
    "Here is a list of tips for a good night's sleep:\n1.",
    "The mitochondria is",
    "She opened the old wooden door and saw",
    "import numpy as np\n\n# compute the mean of",
    "Climate change affects agriculture because",
    "The best way to learn to play the guitar is",
    "In 1969, the first humans",
    "My favourite book is",
    "A healthy breakfast could include",
    "The difference between a virus and a bacterium is",
    "He looked at the map and realised that",
    "Water boils at 100 degrees Celsius when",
    "The new smartphone features",
    "Translate to French: Good morning, how are you?\n",
)


@dataclass(frozen=True, kw_only=True)
class GeneralTextConfig:
    """How many base-model samples: ``n_prompts`` of :data:`PROMPTS`, ``new_tokens`` sampled each."""

    n_prompts: int = 24
    new_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_prompts <= len(PROMPTS):
            raise ConfigError(f"n_prompts must be in 1..{len(PROMPTS)}, got {self.n_prompts}")
        if self.new_tokens < 1:
            raise ConfigError(f"new_tokens must be >= 1, got {self.new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True, kw_only=True)
class GeneralText:
    """Sampled sequences (prompt + continuation), with a mask of the continuation tokens to score."""

    input_ids: Tensor  # [batch, pos] right-padded
    attention_mask: Tensor
    score_mask: Tensor  # 1 where the token is a sampled continuation token (it is predicted)
    texts: tuple[str, ...]
    config: GeneralTextConfig

    def describe(self) -> str:
        c = self.config
        return (
            f"the base model's own samples: {c.n_prompts} diverse prompts (stories, science, code, recipes, "
            f"history, letters, lists), {c.new_tokens} tokens sampled at temperature {c.temperature}, "
            f"seed {c.seed}; loss = mean cross-entropy of the sampled tokens"
        )


@torch.no_grad()
def base_samples(base: LoadedModel, config: GeneralTextConfig | None = None) -> GeneralText:
    """Sample continuations of :data:`PROMPTS` from ``base`` (its adapter switched off if it has one)."""
    config = config or GeneralTextConfig()
    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(config.seed)
    seqs, n_prompt = [], []
    with base.active() as module:
        for prompt in PROMPTS[: config.n_prompts]:
            ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=base.device)
            out = module.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=config.new_tokens,
                do_sample=True,
                temperature=config.temperature,
                top_k=0,
                pad_token_id=pad,
            )
            seqs.append(out[0].cpu())
            n_prompt.append(ids.shape[1])
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    score = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, n_prompt, strict=True)):
        input_ids[i, : len(s)] = s
        attention[i, : len(s)] = 1
        score[i, p : len(s)] = 1
    texts = tuple(tok.decode(s, skip_special_tokens=True) for s in seqs)
    return GeneralText(
        input_ids=input_ids, attention_mask=attention, score_mask=score, texts=texts, config=config
    )


@torch.no_grad()
def continuation_loss(module: nn.Module, text: GeneralText) -> float:
    """Mean cross-entropy (nats per token) of ``module`` on the sampled continuation tokens of ``text``."""
    dev = next(module.parameters()).device
    logits = module(
        input_ids=text.input_ids.to(dev), attention_mask=text.attention_mask.to(dev)
    ).logits.float()
    target = text.input_ids[:, 1:].to(dev)
    mask = text.score_mask[:, 1:].to(dev).bool()
    nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
    return float(nll[mask].mean())
