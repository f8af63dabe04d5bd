"""Batched activation capture for a model or a pair: into memory, or streamed to an ActivationStore.

Prompts run in batches through a backend that reads only the requested sites; each activation is cut to
the requested positions (a named position of the task, such as ``last`` or ``query_label``, or ``all``)
before the next batch runs, so memory holds one batch of full activations at most. Streaming to a store
writes one shard at a time and skips the shards a previous run completed.

Example (``pair``: a base and its fine-tune, tiny 4-layer Llamas with d_model 64; ``dataset``: 12
entity-tracking prompts):
    >>> from tunelens.cache import CacheConfig, capture, capture_pair
    >>> from tunelens.sites import Site
    >>> cfg = CacheConfig(sites=(Site("resid_post", 0), Site.parse("resid_post.3")), positions="last")
    >>> acts = capture(pair.base, dataset.encode(pair.tokenizer), cfg)
    >>> {str(site): tuple(a.shape) for site, a in acts.items()}  # batch d_model
    {'resid_post.0': (12, 64), 'resid_post.3': (12, 64)}
    >>> both = capture_pair(pair, dataset, cfg)  # the same tokens through each model
    >>> sorted(both), tuple(both["tuned"][Site("resid_post", 3)].shape)
    (['base', 'tuned'], (12, 64))
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tunelens.backends.base import at_positions
from tunelens.errors import ConfigError, PromptError
from tunelens.models.loaded import BACKENDS, LoadedModel
from tunelens.models.pair import ModelPair
from tunelens.sites import Site
from tunelens.store import DTYPES, ActivationStore, StoreSpec
from tunelens.tasks.base import Dataset, Encoded

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """What to capture: sites, at which positions, in what batch size, through which backend."""

    sites: tuple[Site, ...]
    positions: str = "last"
    batch_size: int = 16
    backend: str = "bridge"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.sites:
            raise ConfigError("CacheConfig.sites is empty; expected at least one site")
        bad = [s for s in self.sites if not isinstance(s, Site)]
        if bad:
            raise ConfigError(
                f"CacheConfig.sites must be Site objects, got {bad[0]!r}; use Site.parse('...')"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def _positions(enc: Encoded, name: str) -> Tensor | None:
    if name == "all":
        return None
    return enc.position(name, also=("all",))


def _pad_to(t: Tensor, length: int, axis: int) -> Tensor:
    if t.shape[axis] == length:
        return t
    pad = list(t.shape)
    pad[axis] = length - t.shape[axis]
    return torch.cat([t, t.new_zeros(pad)], dim=axis)


@torch.no_grad()
def capture(
    model: LoadedModel, enc: Encoded, cfg: CacheConfig, *, progress: Progress | None = None
) -> dict[Site, Tensor]:
    """Activations of ``cfg.sites`` at ``cfg.positions`` for every example, stacked along ``batch``."""
    backend = model.backend(cfg.backend)  # type: ignore[arg-type]
    positions = _positions(enc, cfg.positions)
    full_len = enc.tokens.input_ids.shape[1]
    if full_len > model.dims.n_ctx:
        raise PromptError(f"prompts have {full_len} tokens; this model's context is {model.dims.n_ctx}")
    dtype = DTYPES[cfg.dtype]
    parts: dict[Site, list[Tensor]] = {s: [] for s in cfg.sites}
    for start in range(0, len(enc), cfg.batch_size):
        part = enc.select(slice(start, start + cfg.batch_size))
        width = int(part.tokens.lengths.max())
        tokens = part.tokens.select((slice(None), slice(0, width)))
        out = backend.run(tokens, reads=list(cfg.sites), logits=False)
        for s in cfg.sites:
            act = out.acts[s]
            if positions is None:
                axis = 2 if s.kind == "pattern" and s.head is None else 1
                act = _pad_to(act, full_len, axis)
                if s.kind == "pattern":
                    act = _pad_to(act, full_len, act.ndim - 1)
            else:
                act = at_positions(act, s, positions[start : start + len(part)])
                if s.kind == "pattern":
                    act = _pad_to(act, full_len, act.ndim - 1)
            parts[s].append(act.to("cpu", dtype))
        if progress is not None:
            progress(min(start + cfg.batch_size, len(enc)), len(enc))
    return {s: torch.cat(v) for s, v in parts.items()}


def capture_pair(
    pair: ModelPair, data: Dataset | Encoded, cfg: CacheConfig, *, progress: Progress | None = None
) -> dict[str, dict[Site, Tensor]]:
    """:func:`capture` on both models of a pair, on the very same tokens."""
    enc = data.encode(pair.tokenizer) if isinstance(data, Dataset) else data
    return {role: capture(m, enc, cfg, progress=progress) for role, m in pair}


def store_spec(pair: ModelPair, dataset: Dataset, cfg: CacheConfig, role: str, shard_size: int) -> StoreSpec:
    return StoreSpec(
        models=pair.hashes(),
        sources={r: m.source.describe() for r, m in pair},
        sites=tuple(str(s) for s in cfg.sites),
        positions=cfg.positions,
        dtype=cfg.dtype,
        dataset_hash=dataset.content_hash(),
        n_items=len(dataset),
        shard_size=shard_size,
        extra={"role": role, "task": dataset.task, "backend": cfg.backend},
    )


def cache_to_store(
    pair: ModelPair,
    dataset: Dataset,
    cfg: CacheConfig,
    folder: str | Path,
    *,
    shard_size: int = 256,
    progress: Progress | None = None,
) -> dict[str, ActivationStore]:
    """Stream activations of both models into ``folder/base`` and ``folder/tuned``, shard by shard.

    A rerun resumes after the last complete shard; a folder made from other models, sites or data is
    refused (:class:`~tunelens.errors.StoreMismatchError`), never overwritten.
    """
    folder = Path(folder)
    enc = dataset.encode(pair.tokenizer)
    stores = {
        role: ActivationStore.create(folder / role, store_spec(pair, dataset, cfg, role, shard_size))
        for role, _ in pair
    }
    total = sum(len(s.missing_shards()) for s in stores.values())
    done = 0
    for role, model in pair:
        store = stores[role]
        for i in store.missing_shards():
            rng = store.shard_range(i)
            part = enc.select(slice(rng.start, rng.stop))
            acts = capture(model, part, cfg)
            tensors = {str(s): a for s, a in acts.items()}
            tensors["answer_ids"] = part.answer_ids
            if cfg.positions != "all":
                tensors["positions"] = part.positions[cfg.positions]
            store.write_shard(i, tensors)
            done += 1
            if progress is not None:
                progress(done, total)
    return stores
