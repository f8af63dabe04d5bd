"""One pass per model over a data set: activations of every layer at the last token, and the greedy
next token there (the final residual, unembedded with the model's own final norm and head).

Getting the model's answer from the captured last-layer residual saves a second forward pass; the
integration test checks it against the plain HF forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.studies.settings import CaptureSettings
from tunelens.backends.stepwise import Stepper
from tunelens.cache import CacheConfig, capture
from tunelens.models.pair import ModelPair
from tunelens.sites import Site
from tunelens.tasks.base import Dataset

Progress = Callable[[str], None]


def capture_last(
    pair: ModelPair,
    data: Dataset,
    *,
    site_kind: str = "resid_post",
    batch_size: int = 16,
    backend: str = "bridge",
    progress: Progress | None = None,
) -> tuple[dict[str, Float[Tensor, "layer batch d_model"]], dict[str, Int[Tensor, " batch"]]]:
    """``site_kind`` at every layer, last token, per role; and each model's greedy next-token id."""
    n_layers = pair.dims.n_layers
    sites = [Site(site_kind, layer) for layer in range(n_layers)]  # type: ignore[arg-type]
    final = Site("resid_post", n_layers - 1)
    reads = tuple(sites) if final in sites else (*sites, final)
    cfg = CacheConfig(sites=reads, positions="last", batch_size=batch_size, backend=backend)
    enc = data.encode(pair.tokenizer)
    acts, top = {}, {}
    for role, model in pair:
        if progress is not None:
            progress(
                f"  capturing {len(data)} {data.task} prompts on {role} ({n_layers} layers of {site_kind})"
            )
        got = capture(model, enc, cfg)
        acts[role] = torch.stack([got[s] for s in sites])
        with torch.no_grad(), model.active() as module:
            stepper = Stepper(module)
            h = got[final].to(model.device, next(module.parameters()).dtype)
            top[role] = torch.cat([stepper.unembed(c).argmax(-1).cpu() for c in h.split(256)])
    return acts, top


def capture_for(
    pair: ModelPair, data: Dataset, settings: CaptureSettings, *, progress: Progress | None = None
) -> tuple[dict[str, Float[Tensor, "layer batch d_model"]], dict[str, Int[Tensor, " batch"]]]:
    """:func:`capture_last` as a study's settings say (site kind, batch size, backend)."""
    return capture_last(
        pair,
        data,
        site_kind=settings.site_kind,
        batch_size=settings.batch_size,
        backend=settings.backend,
        progress=progress,
    )
