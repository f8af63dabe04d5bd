"""A decoder run layer by layer, from any layer and any position on, with every per-head value in reach,
for any declared HF family (:mod:`tunelens.families`).

Patching sweeps change one thing at layer ``L`` and position ``p`` and read the logits at the last
position. Everything before ``L``, and every position before ``p`` at every layer, is what the unpatched
run computed. :class:`Stepper` exploits this: it calls the HF model's **own** decoder layers (norms,
projections, attention function, rotary tables, masks and sliding windows, soft-caps; peft adapters
included) one layer at a time on the positions ``start..`` only. The keys and values of positions
``< start`` come from a cached run, handed to the layer's attention as its key/value cache
(:class:`PrefixKV`), and the position ids, rope and mask are those of positions ``start..``. It unembeds
only the rows a metric reads. A ``hook(layer, kind, tensor)`` sees, and may replace, every intermediate value
of a layer; the hooks are PyTorch hooks on the modules the family declares, registered for one layer call
and removed when it returns or raises:

==========  =============================================  ==========================================
kind        where it is read (and written)                 shape
==========  =============================================  ==========================================
resid_pre   the layer's input                              rows pos d_model
q, k, v     the q/k/v projection's output (the declared    rows pos head d_head / kv_head d_head
            block of a fused one), before rotary and norms
pattern     the attention probabilities, from the family's rows head pos(query) pos(key, all so far)
            own attention function
z           per-head output, the input of the out-proj     rows pos head d_head
attn_out    what attention adds to the residual            rows pos d_model
resid_mid   resid_pre + attn_out (absent for a parallel    rows pos d_model
            residual: GPT-NeoX)
mlp_out     what the MLP adds to the residual              rows pos d_model
resid_post  the layer's output                             rows pos d_model
==========  =============================================  ==========================================

The kinds and their meaning are those of :mod:`tunelens.sites`; the backend tests and the patching tests
check that this runner gives the backends' activations and logits, and ``tests/unit/families`` checks it
against the plain HF forward on all ten families. Prompts are right-padded, so real tokens never attend to
padding and no padding mask is needed for the positions a metric reads.

Writing ``pattern`` replaces the attention output by ``pattern @ v`` (every family's attention ends with
that product); writing ``resid_mid`` shifts what attention adds by the difference.

Example (``model``: a :class:`~tunelens.models.loaded.LoadedModel`, here a tiny 4-layer Llama):
    >>> import torch
    >>> batch = model.encode(["The pen is in Box C. The cup is in Box D. Box C contains the"])
    >>> stepper = Stepper(model.module)
    >>> with torch.no_grad():
    ...     run = stepper.trace(batch.input_ids, batch.last)  # every layer's input, rotated keys/values
    ...     h = run.resid[2][:, 5:]  # start at layer 2, position 5, from the cached residual
    ...     for layer in range(2, stepper.n_layers):
    ...         h = stepper.layer(layer, h, start=5, past=run.past(layer, 5))
    >>> len(run.resid), tuple(run.keys[0].shape), tuple(run.logits.shape)  # keys: rows kv_head pos d_head
    (5, (1, 2, 18, 16), (1, 89))
    >>> torch.allclose(h, run.resid[-1][:, 5:], atol=1e-5)  # what the full run computed there
    True
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tunelens.backends.layerwise import _MASKS, layer_types, unembed
from tunelens.dims import ModelDims
from tunelens.errors import ShapeError
from tunelens.families import family_of
from tunelens.families.base import _get, _unwrap, as_slice, put_features, take_features
from tunelens.sites import SITE_KINDS

Hook = Callable[[int, str, Tensor], Tensor | None]
LAYER_KINDS = tuple(k for k in SITE_KINDS if k != "logits")  # the backends' Site kinds, inside a layer

# -- the family's own attention, with the probabilities in reach ------------------------------------------
_IMPLEMENTATION = "tunelens_eager"
_PATTERN: ContextVar[tuple[int, Callable[[str, Tensor], Tensor]] | None] = ContextVar("pattern", default=None)


def _own_eager(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The family's own eager attention (``eager_attention_forward`` of the module's modeling file), with a
    ``pattern`` hook after the softmax. Registered with transformers as an attention implementation, and
    switched on only while a :class:`Stepper` runs a layer."""
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's optional eager variant
        out, weights = module._upcast_and_reordered_attn(query, key, value, attention_mask)
    else:
        own = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = own(module, query, key, value, attention_mask, **kwargs)
    at = _PATTERN.get()
    if at is not None:
        new = at("pattern", weights)
        if new is not weights:
            group = new.shape[1] // value.shape[1]
            v = value.repeat_interleave(group, dim=1) if group > 1 else value
            out = (new.to(value.dtype) @ v).transpose(1, 2).contiguous()
            weights = new
    return out, weights


AttentionInterface.register(_IMPLEMENTATION, _own_eager)
AttentionMaskInterface.register(_IMPLEMENTATION, eager_mask)


class PrefixKV:
    """The keys and values of positions ``< start`` of one layer, in the role of HF's key/value cache: the
    layer's attention appends its new (rotated) keys and values to them, and the mask helpers read the
    query offset and key length from it. ``keep``, if a list, receives the new keys and values."""

    def __init__(self, start: int, past: tuple[Tensor, Tensor] | None, keep: list | None) -> None:
        self.start, self.past, self.keep = start, past, keep

    def update(self, key: Tensor, value: Tensor, layer_idx: int, cache_kwargs: Any = None):
        if self.keep is not None:
            self.keep.append((key, value))
        if self.past is None or self.start == 0:
            return key, value
        k, v = self.past
        return torch.cat([k.to(key.dtype), key], dim=2), torch.cat([v.to(value.dtype), value], dim=2)

    def get_query_offset(self, layer_idx: int | None = None) -> int:
        return self.start

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = None) -> tuple[int, int]:
        return self.start + query_length, 0

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.start


class _Stop(Exception):
    """Raised by a pre-hook on the first layer to end a forward once the embedding is known."""

    def __init__(self, hidden: Tensor) -> None:
        self.hidden = hidden


@dataclass(frozen=True, kw_only=True)
class Trace:
    """What a full run leaves for later partial runs: each layer's input and rotated keys/values.

    ``resid[l]`` is the input of layer ``l``; ``resid[n_layers]`` the last layer's output (before the final
    norm). ``keys[l]``/``values[l]`` have shape ``rows kv_head pos d_head`` (keys after their norms and
    rotary: what HF's cache would hold). ``acts`` holds whatever else the run was asked to record, by
    ``(layer, kind)``.
    """

    resid: list[Float[Tensor, "batch pos d_model"]]
    keys: list[Tensor]
    values: list[Tensor]
    acts: dict[tuple[int, str], Tensor]
    logits: Float[Tensor, "batch d_vocab"] | None

    def past(self, layer: int, start: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``< start`` at ``layer`` (optionally of some rows only)."""
        k, v = self.keys[layer][..., :start, :], self.values[layer][..., :start, :]
        if rows is not None:
            k, v = k[rows], v[rows]
        return k, v


class Stepper:
    """Layer-by-layer runner over an HF causal LM of any declared family (or a peft model wrapping one).

    The caller switches adapters (``with loaded.active():``); the stepper only calls the modules.
    """

    def __init__(self, model: nn.Module) -> None:
        self.hf = _unwrap(model)
        self.config = self.hf.config
        self.family = family_of(self.hf)
        self.layers = self.family.layer_modules(self.hf)
        self.n_layers = len(self.layers)
        self.kinds = layer_types(self.config, self.n_layers)
        self._rope = getattr(self.hf.base_model, "rotary_emb", None)
        self._rope_per_kind = (
            self._rope is not None and "layer_type" in inspect.signature(self._rope.forward).parameters
        )
        params = inspect.signature(self.layers[0].forward).parameters
        self._cache_kw = "layer_past" if "layer_past" in params else "past_key_values"
        dims = ModelDims.from_hf_config(self.config)
        self.parallel = dims.parallel_residual  # attention and MLP both read the layer input: no resid_mid
        self.d_head = dims.d_head
        self._qkv: dict[str, list[tuple[str, slice | Tensor]]] = {}
        for kind, (path, index) in self.family.qkv_rows(dims).items():
            self._qkv.setdefault(path, []).append((kind, as_slice(index)))
        self._configs = list({id(c): c for c in _configs(self.hf)}.values())

    # -- pieces --------------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Float[Tensor, "batch pos d_model"]:
        """The first layer's input, as the HF model computes it (token embedding, learned positions,
        Gemma's scale, ...): the model's own forward, stopped at the first layer."""

        def stop(_module, args, kwargs):
            raise _Stop(args[0] if args else kwargs["hidden_states"])

        handle = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.hf.base_model(input_ids=input_ids, use_cache=False)
        except _Stop as done:
            return done.hidden
        finally:
            handle.remove()
        raise ShapeError("the model's forward never reached its first layer")  # pragma: no cover

    def unembed(self, h: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows d_vocab"]:
        """Final norm, unembedding (and Gemma's logit soft-capping) of the rows given."""
        return unembed(self.hf, self.family, h)

    def available(self, kind: str) -> bool:
        """Whether this model has ``kind`` (a parallel residual has no ``resid_mid``)."""
        return kind in LAYER_KINDS and not (kind == "resid_mid" and self.parallel)

    # -- one layer -----------------------------------------------------------------------------------
    def layer(
        self,
        layer: int,
        h: Float[Tensor, "rows pos d_model"],
        *,
        start: int = 0,
        past: tuple[Tensor, Tensor] | None = None,
        hook: Hook | None = None,
        keep_kv: list | None = None,
    ) -> Float[Tensor, "rows pos d_model"]:
        """Layer ``layer`` on positions ``start .. start+pos-1``; ``past`` holds positions ``< start``.

        ``keep_kv``, if a list, receives the (rotated key, value) of the new positions.
        """
        if past is not None and past[0].shape[-2] != start:
            raise ShapeError(
                f"layer {layer}: past keys cover {past[0].shape[-2]} positions, expected start={start}"
            )
        if past is None and start > 0:
            raise ShapeError(
                f"layer {layer}: start={start} needs the keys and values of the positions before"
            )

        def at(kind: str, t: Tensor) -> Tensor:
            out = hook(layer, kind, t)
            return t if out is None else out

        if hook is not None:
            h = at("resid_pre", h)
        cache = PrefixKV(start, past, keep_kv)
        with self._own_attention():
            kwargs = self._layer_inputs(layer, h, cache)
            with self._hooks(layer, h, at if hook is not None else None):
                out = self.layers[layer](h, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return at("resid_post", out) if hook is not None else out

    def _layer_inputs(self, layer: int, h: Tensor, cache: PrefixKV) -> dict[str, Any]:
        """What the HF model's forward passes a layer, for positions ``cache.start ..``: the mask of the
        layer's kind (full or sliding) from transformers' helpers, position ids, rope, and the cache."""
        kind, n = self.kinds[layer], h.shape[1]
        pos = torch.arange(cache.start, cache.start + n, device=h.device)[None]
        mask = _MASKS[kind](
            config=self.config, inputs_embeds=h, attention_mask=None, past_key_values=cache, position_ids=pos
        )
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": pos, self._cache_kw: cache}
        if self._rope is not None:
            kwargs["position_embeddings"] = (
                self._rope(h, pos, kind) if self._rope_per_kind else self._rope(h, pos)
            )
        return kwargs

    @contextmanager
    def _own_attention(self) -> Iterator[None]:
        """The family's own eager attention, with the pattern hook, for the duration of one layer call."""
        before = [c._attn_implementation_internal for c in self._configs]
        for c in self._configs:
            c._attn_implementation_internal = _IMPLEMENTATION
        try:
            yield
        finally:
            for c, was in zip(self._configs, before, strict=True):
                c._attn_implementation_internal = was

    @contextmanager
    def _hooks(self, layer: int, h: Tensor, at: Callable[[str, Tensor], Tensor] | None) -> Iterator[None]:
        """PyTorch hooks on the declared modules of ``layer`` that route each value through ``at``."""
        if at is None:
            yield
            return
        fam, block, d = self.family, self.layers[layer], self.d_head

        def heads(kind_blocks):
            def hook(_module, _args, out):
                rows, n = out.shape[:2]
                new_out = out
                for kind, index in kind_blocks:
                    old = take_features(out, index).view(rows, n, -1, d)
                    new = at(kind, old)
                    if new is not old:
                        if new_out is out:
                            new_out = out.clone()
                        put_features(new_out, index, new.reshape(rows, n, -1))
                return new_out

            return hook

        def z_hook(_module, args):
            z = args[0]
            rows, n = z.shape[:2]
            old = z.view(rows, n, -1, d)
            new = at("z", old)
            if new is not old:
                return (new.reshape(rows, n, -1).to(z.dtype), *args[1:])
            return None

        def attn_hook(_module, _args, out):
            first = out[0] if isinstance(out, tuple) else out
            new = at("attn_out", first)
            if not self.parallel:
                mid = h + new
                new_mid = at("resid_mid", mid)
                if new_mid is not mid:
                    new = new_mid - h
            if new is first:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        def mlp_hook(_module, _args, out):
            first = out[0] if isinstance(out, tuple) else out
            new = at("mlp_out", first)
            if new is first:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        token = _PATTERN.set(at)
        with ExitStack() as stack:
            for path, kind_blocks in self._qkv.items():
                stack.enter_context(_handle(_get(block, path).register_forward_hook(heads(kind_blocks))))
            stack.enter_context(_handle(_get(block, fam.out_proj).register_forward_pre_hook(z_hook)))
            stack.enter_context(_handle(_get(block, fam.attn_add).register_forward_hook(attn_hook)))
            stack.enter_context(_handle(_get(block, fam.mlp_add).register_forward_hook(mlp_hook)))
            try:
                yield
            finally:
                _PATTERN.reset(token)

    # -- a full run ----------------------------------------------------------------------------------
    def trace(
        self,
        input_ids: Tensor,
        last: Tensor,
        *,
        record: Sequence[str] = (),
        hook: Hook | None = None,
        stop: int | None = None,
    ) -> Trace:
        """Run all layers (or up to ``stop``) on every position, keeping each layer's input, keys and values,
        the kinds in ``record`` at every layer, and the logits at each row's ``last`` position."""
        for kind in record:
            if not self.available(kind):
                known = [k for k in LAYER_KINDS if self.available(k)]
                raise ShapeError(f"cannot record {kind!r} on this model; expected one of {', '.join(known)}")
        acts: dict[tuple[int, str], Tensor] = {}

        def rec(layer: int, kind: str, t: Tensor) -> Tensor | None:
            if hook is not None:
                out = hook(layer, kind, t)
                t = t if out is None else out
            if kind in record:
                acts[(layer, kind)] = t
            return t

        h = self.embed(input_ids)
        resid, keys, values = [], [], []
        stop = self.n_layers if stop is None else stop
        for layer in range(stop):
            resid.append(h)
            kv: list = []
            h = self.layer(layer, h, hook=rec if (record or hook) else None, keep_kv=kv)
            keys.append(kv[0][0])
            values.append(kv[0][1])
        resid.append(h)
        logits = None
        if stop == self.n_layers:
            logits = self.unembed(h[torch.arange(h.shape[0], device=h.device), last.to(h.device)])
        return Trace(resid=resid, keys=keys, values=values, acts=acts, logits=logits)


@contextmanager
def _handle(handle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


def _configs(model: nn.Module) -> list[Any]:
    """Every config object the model's modules read their attention implementation from."""
    found = [model.config]
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            found.append(cfg)
    return found
