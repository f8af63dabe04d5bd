"""Batched backend runs the knob analyses share: last-token residuals, the logit lens, candidate logits.

Every run goes through the model's :class:`~tunelens.backends.base.Backend` (``Backend.run`` with
``Write`` s); the answer is read as the logit lens of the last layer's residual at each prompt's last
token, which *is* the model's next-token logits (final norm + unembedding; checked in the tests), without
unembedding every position.

Example:
    >>> import torch
    >>> from tunelens.models.tiny import TinyConfig, tiny_llama, tiny_tokenizer
    >>> from tunelens.models.loaded import LoadedModel, ModelSource
    >>> tok = tiny_tokenizer()
    >>> m = LoadedModel(tiny_llama(TinyConfig(n_layers=2), len(tok.get_vocab()), seed=0), tok,
    ...                 source=ModelSource(kind="memory", location="tiny"))
    >>> tokens = m.encode(["The cup is in Box F", "Box F contains the"])
    >>> lens = last_logits(m, tokens)
    >>> torch.allclose(lens, m.logits(tokens)[torch.arange(2), tokens.last], atol=1e-4)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tunelens import readout
from tunelens.backends.base import TokenBatch, Write
from tunelens.backends.layerwise import unembed
from tunelens.errors import SiteError
from tunelens.sites import Site

WritesFor = Callable[[slice, TokenBatch], Sequence[Write]]
"""Builds the writes of one chunk of a batch: ``(rows of the chunk, its tokens) -> writes``."""


def check_layer(model, layer: int) -> int:
    """``layer`` if it is a valid block index of ``model``, else :class:`SiteError`."""
    n = model.dims.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise SiteError(f"layer {layer!r} out of range; {model.name} has layers 0..{n - 1}")
    return layer


def lens(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """The logit lens: the final norm and unembedding of ``model`` applied to residuals."""
    with torch.no_grad() if not resid.requires_grad else torch.enable_grad():
        return unembed(model.hf, model.family, resid.to(model.device))


def _chunks(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def last_resid(
    model,
    tokens: TokenBatch,
    layers: Sequence[int],
    *,
    writes: WritesFor | None = None,
    batch_size: int = 32,
    grad: bool = False,
) -> Float[Tensor, "batch layer d_model"]:
    """``resid_post`` of each of ``layers`` at each prompt's last token (with optional writes)."""
    for layer in layers:
        check_layer(model, layer)
    backend = model.backend()
    sites = [Site("resid_post", layer) for layer in layers]
    out = []
    for sl in _chunks(len(tokens), batch_size):
        part = tokens.select(sl)
        run = backend.run(
            part, reads=sites, writes=writes(sl, part) if writes else (), grad=grad, logits=False
        )
        rows = torch.arange(len(part))
        last = part.last.to(run.acts[sites[0]].device)
        out.append(torch.stack([run.acts[s][rows, last] for s in sites], dim=1))
    return torch.cat(out).float() if not grad else torch.cat(out)


def last_logits(
    model, tokens: TokenBatch, *, writes: WritesFor | None = None, batch_size: int = 32, grad: bool = False
) -> Float[Tensor, "batch d_vocab"]:
    """Next-token logits at each prompt's last token (final-layer logit lens), with optional writes."""
    final = model.dims.n_layers - 1
    resid = last_resid(model, tokens, [final], writes=writes, batch_size=batch_size, grad=grad)[:, 0]
    return lens(model, resid)


def candidate_logits(
    model,
    tokens: TokenBatch,
    candidates: Int[Tensor, "batch 2"],
    *,
    writes: WritesFor | None = None,
    batch_size: int = 32,
) -> Float[Tensor, "batch 2"]:
    """The logits of each prompt's two candidate answers (column 0 prior, 1 context)."""
    logits = last_logits(model, tokens, writes=writes, batch_size=batch_size)
    return readout.candidate_logits(logits, candidates).cpu()


def picks_context(cand_logits: Float[Tensor, "batch 2"]) -> Tensor:
    """True where the context answer beats the prior answer (restricted to the two candidates)."""
    return cand_logits[:, 1] > cand_logits[:, 0]
