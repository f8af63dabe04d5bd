"""Model pairs (base, tuned) and families (one base, several tuned variants).

A pair is only built from comparable models: the same architecture sizes and the same tokenizer
(identical vocabulary and ids). Otherwise :class:`PairIncompatibleError` names the first mismatch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tunelens.errors import ConfigError, PairIncompatibleError
from tunelens.models.loaded import LoadedModel

ROLES = ("base", "tuned")


def check_compatible(base: LoadedModel, tuned: LoadedModel) -> None:
    """Raise :class:`PairIncompatibleError` at the first difference that makes two models incomparable."""
    a, b = base.dims.to_dict(), tuned.dims.to_dict()
    for key in a:
        if a[key] != b[key]:
            raise PairIncompatibleError(
                f"{key} differs: base {base.name!r} has {a[key]}, tuned {tuned.name!r} has {b[key]}; "
                "a pair needs two models of the same architecture and sizes"
            )
    if base.dtype != tuned.dtype:
        raise PairIncompatibleError(
            f"dtype differs: base {base.name!r} is {str(base.dtype).removeprefix('torch.')}, tuned "
            f"{tuned.name!r} is {str(tuned.dtype).removeprefix('torch.')}; load both in one dtype (dtype=...)"
        )
    va, vb = base.tokenizer.get_vocab(), tuned.tokenizer.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))
        only_b = sorted(set(vb) - set(va))
        if only_a or only_b:
            tok = (only_a or only_b)[0]
            where = "base" if only_a else "tuned"
            raise PairIncompatibleError(
                f"tokenizers differ: token {tok!r} is only in the {where} tokenizer "
                f"({len(va)} vs {len(vb)} tokens); a pair needs identical tokenizers"
            )
        tok = next(t for t in sorted(va) if va[t] != vb[t])
        raise PairIncompatibleError(
            f"tokenizers differ: token {tok!r} has id {va[tok]} in base but {vb[tok]} in tuned"
        )
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
        x, y = getattr(base.tokenizer, special), getattr(tuned.tokenizer, special)
        if x != y:
            raise PairIncompatibleError(f"tokenizers differ: {special} is {x} in base but {y} in tuned")


@dataclass(eq=False)
class ModelPair:
    """A base model and one fine-tune of it, checked comparable at construction."""

    base: LoadedModel
    tuned: LoadedModel
    name: str = ""

    def __post_init__(self) -> None:
        check_compatible(self.base, self.tuned)
        if not self.name:
            self.name = f"{self.base.name} -> {self.tuned.name}"

    def __iter__(self) -> Iterator[tuple[str, LoadedModel]]:
        yield "base", self.base
        yield "tuned", self.tuned

    def __getitem__(self, role: str) -> LoadedModel:
        if role not in ROLES:
            raise ConfigError(f"role must be 'base' or 'tuned', got {role!r}")
        return self.base if role == "base" else self.tuned

    @property
    def dims(self):
        return self.base.dims

    @property
    def tokenizer(self):
        return self.base.tokenizer

    def hashes(self) -> dict[str, str]:
        return {role: m.content_hash for role, m in self}

    def describe(self) -> dict[str, Any]:
        """Sizes, sources and content hashes: what a stored result says it was computed on."""
        return {
            "name": self.name,
            "dims": self.dims.to_dict(),
            "models": {
                role: {"name": m.name, "source": m.source.describe(), "hash": m.content_hash}
                for role, m in self
            },
        }


@dataclass(eq=False)
class ModelFamily:
    """One base with several tuned variants (LoRA ranks, full, other tasks) for sweeps over fine-tunes."""

    base: LoadedModel
    variants: Mapping[str, LoadedModel] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        for variant in self.variants.values():
            check_compatible(self.base, variant)

    def pair(self, variant: str) -> ModelPair:
        if variant not in self.variants:
            raise ConfigError(
                f"family {self.name!r} has no variant {variant!r}; it has {sorted(self.variants)}"
            )
        return ModelPair(self.base, self.variants[variant], name=f"{self.name}:{variant}")

    def pairs(self) -> Iterator[ModelPair]:
        for variant in self.variants:
            yield self.pair(variant)


PairLike = ModelPair | tuple[LoadedModel, LoadedModel]
"""What the cross-model analyses take: a :class:`ModelPair`, or ``(base, tuned)`` loaded models."""
