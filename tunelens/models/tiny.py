"""Tiny models of the real models' HF architecture (Llama with grouped-query attention), for fast tests.

The tokenizer is word level over the tasks' vocabulary, so prompts of the entity-tracking task mean the
same thing to a tiny model as to SmolLM2, and a tiny model trains in seconds on this CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tunelens.tasks import entity_tracking

SPECIAL = ("<pad>", "<unk>", "<eos>")
TEMPLATE_WORDS = (
    "The", "the", "is", "in", "Box", "contains", ".", ",", ":", "?", "Context", "Instruction", "Question",
    "Answer", "Only", "consider", "Ignore", "context", "capital", "of", "What",
)  # fmt: skip


def tiny_vocab() -> list[str]:
    words = (
        list(SPECIAL) + list(TEMPLATE_WORDS) + list(entity_tracking.OBJECTS) + list(entity_tracking.LABELS)
    )
    return list(dict.fromkeys(words))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: whitespace and punctuation split words, unknown words map to ``<unk>``."""
    vocab = {w: i for i, w in enumerate(tiny_vocab())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", padding_side="right"
    )


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    """Sizes of a tiny Llama (defaults: 4 layers, 4 query / 2 KV heads, d_model 64)."""

    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 128
    n_ctx: int = 128


def tiny_llama(cfg: TinyConfig, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama, deterministic from ``seed``."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.n_ctx,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gemma(cfg: TinyConfig, vocab_size: int, seed: int):
    """A randomly initialised tiny Gemma-3 (post-attention and post-MLP norms, one KV head)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=1,
        head_dim=cfg.d_model // cfg.n_heads,
        max_position_embeddings=cfg.n_ctx,
        sliding_window=16,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
        architectures=["Gemma3ForCausalLM"],
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval()


def tiny_family(
    family: str,
    cfg: TinyConfig = TinyConfig(n_layers=3),
    vocab_size: int = 128,
    seed: int = 0,
    *,
    sliding_window: int | None = None,
) -> torch.nn.Module:
    """A randomly initialised tiny model of any declared HF family (:data:`tunelens.families.FAMILIES`),
    built from the family's own HF config class in well under a second; nothing is downloaded.

    Weights are redrawn with standard deviation ``1/sqrt(fan_in)`` (biases and norm weights included), so
    every path carries signal: HF's default initialisation (std 0.02, unit norms, zero biases) would leave
    biases, norm gains and soft-caps untested. ``sliding_window``: a window short enough to bite on short
    prompts (families without one ignore it); GPT-NeoX and GPT-2 have no grouped-query attention, so they
    get ``n_kv_heads = n_heads``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelens.families import FAMILIES

    fam = FAMILIES[family]
    kv = cfg.n_heads if family in ("gpt2", "gpt_neox") else cfg.n_kv_heads
    kw = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": kv,
        "head_dim": cfg.d_model // cfg.n_heads,
        "max_position_embeddings": cfg.n_ctx,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "architectures": list(fam.architectures),
        "attn_implementation": "eager",
        "tie_word_embeddings": family in ("gpt2", "gemma2", "gemma3_text"),
    }
    if family == "gpt2":
        kw = {
            "vocab_size": vocab_size,
            "n_embd": cfg.d_model,
            "n_inner": cfg.d_mlp,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_positions": cfg.n_ctx,
            **{k: kw[k] for k in ("bos_token_id", "eos_token_id", "architectures", "attn_implementation")},
            "tie_word_embeddings": True,
        }
    if family == "gpt_neox":
        kw.pop("head_dim")
        kw.pop("num_key_value_heads")
    config = AutoConfig.for_model(family, **kw)
    if hasattr(config, "sliding_window"):
        config.sliding_window = sliding_window
    if family in ("qwen2", "qwen3") and sliding_window is not None:
        config.use_sliding_window = True
        config.max_window_layers = 1  # layers from the second on slide
        config.layer_types = [
            "sliding_attention" if i >= config.max_window_layers else "full_attention"
            for i in range(cfg.n_layers)
        ]
    if family in ("gemma2", "gemma3_text") and sliding_window is None:
        config.sliding_window = cfg.n_ctx  # the family always has local layers; a window that never bites
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            fan_in = param.shape[-1] if param.ndim > 1 else cfg.d_model
            if fam.conv1d and param.ndim == 2 and not name.endswith(("wte.weight", "wpe.weight")):
                fan_in = param.shape[0]  # Conv1D stores (in, out)
            if (param.ndim == 1 and "norm" in name) or name.endswith(
                ("ln_1.weight", "ln_2.weight", "ln_f.weight")
            ):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
    return model


def induction_batch(token_ids: torch.Tensor, batch: int, half: int, gen: torch.Generator) -> torch.Tensor:
    """Random sequences of ``half`` tokens drawn from ``token_ids``, each repeated once."""
    first = token_ids[torch.randint(len(token_ids), (batch, half), generator=gen)]
    return torch.cat([first, first], dim=1)


def pretrain_induction(
    model: LlamaForCausalLM, token_ids: torch.Tensor, *, steps: int, seed: int, lr: float = 1e-3
) -> list[float]:
    """Train on repeated random sequences (loss on the repeat): the classic way to grow induction heads.
    Returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    predict = torch.zeros(32, dtype=torch.bool)
    predict[17:] = True  # the repeat, from its second token on

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return induction_batch(token_ids, 64, 16, gen), predict.expand(64, -1)

    return _train_to_copy(model, batch, steps=steps, lr=lr)[0]


def _train_to_copy(
    model: LlamaForCausalLM, batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, steps: int, lr: float
) -> tuple[list[float], list[float]]:
    """AdamW on the parameters of ``model`` that require grad, cross-entropy on the tokens ``batch()``'s
    mask marks (``ids``, ``mask``, both ``[batch, pos]``); returns the loss and the accuracy per step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses, accuracy = [], []
    for _ in range(steps):
        ids, mask = batch()
        logits = model(input_ids=ids).logits[:, :-1][mask[:, 1:]]
        target = ids[:, 1:][mask[:, 1:]]
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accuracy.append(float((logits.argmax(-1) == target).float().mean()))
    model.eval()
    return losses, accuracy


def periodic_batch(
    token_ids: torch.Tensor,
    batch: int,
    length: int,
    gen: torch.Generator,
    *,
    periods: tuple[int, int] = (5, 19),
    max_prefix: int = 7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of ``length`` tokens: a random prefix (0..``max_prefix`` tokens), then a pattern of P
    distinct tokens (P drawn from ``periods``, inclusive) repeated. Returns the ids and a mask of the
    positions whose token a model can predict by copying (every position after the first period).

    The period varies, so a head that copies from a fixed relative position cannot solve the task: the
    model has to find the earlier occurrence of the current token by content (induction)."""
    seqs, masks = [], []
    n = len(token_ids)
    for _ in range(batch):
        p = int(torch.randint(periods[0], periods[1] + 1, (1,), generator=gen))
        pattern = token_ids[torch.randperm(n, generator=gen)[:p]]
        prefix = token_ids[
            torch.randint(n, (int(torch.randint(0, max_prefix + 1, (1,), generator=gen)),), generator=gen)
        ]
        seqs.append(torch.cat([prefix, pattern.repeat(length // p + 2)])[:length])
        mask = torch.zeros(length, dtype=torch.bool)
        mask[len(prefix) + p :] = True
        masks.append(mask)
    return torch.stack(seqs), torch.stack(masks)


def train_periodic_induction(
    model: LlamaForCausalLM,
    token_ids: torch.Tensor,
    *,
    steps: int,
    seed: int,
    lr: float = 3e-3,
    batch: int = 32,
    length: int = 40,
) -> list[float]:
    """Train the parameters of ``model`` that require grad on :func:`periodic_batch` data (loss on the
    predictable positions only); returns the accuracy on those positions per step."""
    gen = torch.Generator().manual_seed(seed)
    return _train_to_copy(model, lambda: periodic_batch(token_ids, batch, length, gen), steps=steps, lr=lr)[1]
