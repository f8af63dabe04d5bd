"""Greedy generation with an edit of the residual stream at the last token of every forward pass.

Steering a model while it writes (the context knob's ``h ← h + u(c − uᵀh)``) must act on the prompt's last
token and on every generated token. With a key/value cache each forward pass after the first sees exactly
one new token, so "the last position of every forward" is that token. The backends run whole batches
without a cache; this module instead attaches one forward hook to the HF decoder layer that carries the
site (:func:`tunelens.sites.module_side`, the only place module paths are named) for the duration of a
``with`` block, and removes it in ``finally``.

Example:
    >>> import torch
    >>> from tunelens.models.tiny import TinyConfig, tiny_llama, tiny_tokenizer
    >>> from tunelens.models.loaded import LoadedModel, ModelSource
    >>> from tunelens.sites import Site
    >>> tok = tiny_tokenizer()
    >>> m = LoadedModel(tiny_llama(TinyConfig(n_layers=2), len(tok.get_vocab()), seed=0), tok,
    ...                 source=ModelSource(kind="memory", location="tiny"))
    >>> text = generate_with_edit(m, "Box F contains the", Site("resid_post", 1), lambda h: h, 3)
    >>> text == m.generate("Box F contains the", max_new_tokens=3)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor

from tunelens.errors import ShapeError, SiteError
from tunelens.sites import Site, module_side

LastTokenFn = Callable[[Float[Tensor, "batch d_model"]], Float[Tensor, "batch d_model"]]


def _apply(h: Tensor, fn: LastTokenFn, site: Site) -> Tensor:
    last = h[:, -1]
    new_last = fn(last)
    if not isinstance(new_last, Tensor) or new_last.shape != last.shape:
        got = tuple(new_last.shape) if isinstance(new_last, Tensor) else type(new_last).__name__
        raise ShapeError(f"the edit at {site} must return shape {tuple(last.shape)}, got {got}")
    out = h.clone()
    out[:, -1] = new_last.to(h.dtype)
    return out


@contextmanager
def last_token_edit(model, site: Site, fn: LastTokenFn) -> Iterator[None]:
    """While open, every forward of ``model.module`` replaces the ``site`` activation of the *last
    position* ``h`` by ``fn(h)`` (shape ``(batch, d_model)``). Only ``resid_pre`` / ``resid_post``.

    Use it with unpadded or left-padded prompts, where the last position is every prompt's last token.
    """
    site.validate(model.dims)
    if site.kind not in ("resid_pre", "resid_post"):
        raise SiteError(f"last_token_edit edits the residual stream (resid_pre/resid_post), got {site}")
    where = module_side(site, model.family, model.dims)
    side = where.side
    layer = model.hf.get_submodule(where.path)

    if side == "output":

        def hook(module, args, output):
            if isinstance(output, tuple):
                return (_apply(output[0], fn, site), *output[1:])
            return _apply(output, fn, site)

        handle = layer.register_forward_hook(hook)
    else:

        def pre_hook(module, args, kwargs):
            if args:
                return (_apply(args[0], fn, site), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": _apply(kwargs["hidden_states"], fn, site)}

        handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_with_edit(model, prompt: str, site: Site, fn: LastTokenFn, max_new_tokens: int = 16) -> str:
    """Greedy continuation of one ``prompt`` with ``fn`` applied at ``site`` on the last token of every
    forward pass (the prompt's end, then each generated token); returns the new text only."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ShapeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    batch = model.encode([prompt]).to(model.device)
    tok = model.tokenizer
    with model.active() as m, last_token_edit(model, site, fn):
        out = m.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True)
