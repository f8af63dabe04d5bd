"""Architecture sizes of a model, read once from its HF config.

Everything that validates a site, a head or a tensor width asks a :class:`ModelDims`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The sizes that matter for hooks, in the project's dimension vocabulary."""

    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    parallel_residual: bool = False  # attention and MLP both read the block input (GPT-NeoX): no resid_mid

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The KV head a query head reads its keys and values from."""
        return head // self.group_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelDims:
        """Read sizes from a transformers config (its attribute map covers GPT-2's own names). Which
        families tunelens runs is decided where a model is loaded (``LoadedModel``)."""
        archs = getattr(config, "architectures", None) or []
        arch = archs[0] if archs else type(config).__name__.replace("Config", "ForCausalLM")
        if arch == "Gemma3ForConditionalGeneration":
            arch = "Gemma3ForCausalLM"
        cfg = getattr(config, "text_config", None) or config
        n_heads = cfg.num_attention_heads
        return cls(
            architecture=arch,
            n_layers=cfg.num_hidden_layers,
            d_model=cfg.hidden_size,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            d_head=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            d_mlp=_d_mlp(cfg),
            d_vocab=cfg.vocab_size,
            n_ctx=cfg.max_position_embeddings,
            parallel_residual=bool(getattr(cfg, "use_parallel_residual", False)),
        )


def _d_mlp(cfg: Any) -> int:
    """The MLP width: ``intermediate_size``, GPT-2's ``n_inner``, or GPT-2's default of 4 × d_model."""
    return getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
