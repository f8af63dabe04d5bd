"""Probe inputs from activation stores: ``[layer, batch, d_model]`` per model role, checked.

:func:`tunelens.cache.cache_to_store` writes ``folder/base`` and ``folder/tuned``; :func:`acts_from_stores`
reads one site kind at the requested layers from both and stacks them as :func:`probes.fit_probes` wants.
A site that was not cached is a :class:`~tunelens.errors.SiteError` naming what the store holds; a store
made from other models than the given pair (content hashes) is a
:class:`~tunelens.errors.StoreMismatchError`; two stores of different data sets are refused too.

Example (``pair``: a base and its fine-tune, tiny 4-layer Llamas with d_model 64; ``dataset``: 12
entity-tracking prompts):
    >>> import tempfile
    >>> from tunelens.cache import CacheConfig, cache_to_store
    >>> from tunelens.sites import Site
    >>> cfg = CacheConfig(sites=tuple(Site("resid_post", layer) for layer in range(4)), positions="last")
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     stores = cache_to_store(pair, dataset, cfg, folder, shard_size=8)  # folder/base, folder/tuned
    ...     acts = acts_from_stores(folder, "resid_post", layers=range(4), pair=pair)
    >>> stores["base"]  # doctest: +ELLIPSIS
    ActivationStore('.../base', 2/2 shards)
    >>> {role: tuple(a.shape) for role, a in acts.items()}  # layer batch d_model
    {'base': (4, 12, 64), 'tuned': (4, 12, 64)}
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from tunelens.errors import SiteError, StoreMismatchError
from tunelens.sites import Site
from tunelens.store import ActivationStore


def acts_from_stores(
    folder: str | os.PathLike[str],
    site_kind: str,
    layers: Iterable[int],
    *,
    pair: Mapping[str, str] | object | None = None,
    roles: Iterable[str] = ("base", "tuned"),
) -> dict[str, Float[Tensor, "layer batch d_model"]]:
    """Read ``site_kind`` at ``layers`` from ``folder/<role>`` for each role.

    Args:
        pair: a :class:`~tunelens.models.pair.ModelPair` or its ``hashes()`` (role -> content hash);
            when given, each store must have been made from exactly these models.
    """
    hashes = pair.hashes() if hasattr(pair, "hashes") else pair
    sites = [str(Site(site_kind, int(layer))) for layer in layers]  # type: ignore[arg-type]
    out: dict[str, Tensor] = {}
    dataset = None
    for role in roles:
        store = ActivationStore.open(Path(folder) / role)
        spec = store.spec
        if hashes is not None:
            want = dict(hashes)
            if dict(spec.models) != want:
                raise StoreMismatchError(
                    f"store at {store.path} was made from models {dict(spec.models)}, "
                    f"but this pair is {want}; "
                    "cache the activations of this pair (tunelens.cache.cache_to_store) into a new folder"
                )
        missing = [s for s in sites if s not in spec.sites]
        if missing:
            raise SiteError(
                f"site(s) {missing[:5]}{' …' if len(missing) > 5 else ''} were not cached in {store.path}; "
                f"it holds {list(spec.sites)[:8]}{' …' if len(spec.sites) > 8 else ''}"
            )
        if dataset is not None and spec.dataset_hash != dataset:
            raise StoreMismatchError(
                f"store at {store.path} holds data set {spec.dataset_hash}, the other role's store {dataset}"
            )
        dataset = spec.dataset_hash
        read = store.read(sites)
        out[role] = torch.stack([read[s].float() for s in sites])
    return out
