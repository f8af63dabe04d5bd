"""A decoder run layer by layer, from any layer and any position on, with every per-head value in reach.

Patching sweeps change one thing at layer ``L`` and position ``p`` and read the logits at the last
position. Everything before ``L``, and every position before ``p`` at every layer, is what the unpatched
run computed. :class:`Stepper` exploits this: it runs the HF model's own submodules (norms, projections,
MLP, rotary tables; LoRA adapters included) one layer at a time on the positions ``start..`` only, with
the rotated keys and values of positions ``< start`` taken from a cached run (a key/value cache built by
us, not by transformers), and it unembeds only the rows a metric reads. A ``hook(layer, kind, tensor)``
sees, and may replace, every intermediate value of a layer:

==========  =============================================  ==========================================
kind        meaning (Llama and Gemma-3 layouts)            shape
==========  =============================================  ==========================================
resid_pre   input of the block                             rows pos d_model
q           q_proj output, before rotary (and q_norm)      rows pos head d_head
k, v        k_proj / v_proj output, before rotary/k_norm   rows pos kv_head d_head
pattern     attention probabilities                        rows head pos(query) pos(key, all so far)
z           per-head output, the input of o_proj           rows pos head d_head
attn_out    what attention adds to the residual            rows pos d_model
resid_mid   resid_pre + attn_out                           rows pos d_model
mlp_out     what the MLP adds to the residual              rows pos d_model
resid_post  output of the block                            rows pos d_model
==========  =============================================  ==========================================

The kinds and their meaning are those of :mod:`tunelens.sites`; the backend tests and the patching tests
check that this runner gives the backends' activations and logits. Prompts are right-padded, so real
tokens never attend to padding and no padding mask is needed for the positions a metric reads.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tunelens.errors import ModelLoadError, ShapeError

Hook = Callable[[int, str, Tensor], Tensor | None]
LAYER_KINDS = ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")


@dataclass(frozen=True, kw_only=True)
class Trace:
    """What a full run leaves for later partial runs: each layer's input and rotated keys/values.

    ``resid[l]`` is the input of layer ``l``; ``resid[n_layers]`` the last layer's output (before the final
    norm). ``keys[l]``/``values[l]`` have shape ``rows kv_head pos d_head`` (keys after k_norm and rotary).
    ``acts`` holds whatever else the run was asked to record, by ``(layer, kind)``.
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
    """Layer-by-layer runner over an HF Llama or Gemma-3 causal LM (or a peft model wrapping one).

    The caller switches adapters (``with loaded.active():``); the stepper only calls the modules.
    """

    def __init__(self, model: nn.Module) -> None:
        hf = model.base_model.model if hasattr(model, "peft_config") else model
        body = getattr(hf, "model", None)
        if body is None or not hasattr(body, "layers"):
            raise ModelLoadError(f"expected an HF causal LM with model.layers, got {type(model).__name__}")
        self.hf, self.body = hf, body
        self.config = hf.config
        self.is_gemma = type(hf).__name__.startswith("Gemma3")
        self.n_layers = len(body.layers)
        self.layer_types = getattr(self.config, "layer_types", None)

    # -- pieces --------------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.body.embed_tokens(input_ids)

    def unembed(self, h: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows d_vocab"]:
        """Final norm, unembedding (and Gemma's logit soft-capping) of the rows given."""
        logits = self.hf.lm_head(self.body.norm(h))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _rotary(self, layer: int, h: Tensor, start: int, n: int) -> tuple[Tensor, Tensor]:
        pos = torch.arange(start, start + n, device=h.device)[None]
        if self.is_gemma:
            return self.body.rotary_emb(h, pos, self.layer_types[layer])
        return self.body.rotary_emb(h, pos)

    def _window(self, layer: int) -> int | None:
        if self.is_gemma and self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.config.sliding_window
        return None

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
        blk = self.body.layers[layer]
        attn = blk.self_attn
        rows, n, _ = h.shape
        if past is not None and past[0].shape[-2] != start:
            raise ShapeError(
                f"layer {layer}: past keys cover {past[0].shape[-2]} positions, expected start={start}"
            )

        def at(kind: str, t: Tensor) -> Tensor:
            if hook is None:
                return t
            out = hook(layer, kind, t)
            return t if out is None else out

        h = at("resid_pre", h)
        x = blk.input_layernorm(h)
        d = attn.head_dim
        q = at("q", attn.q_proj(x).view(rows, n, -1, d))
        k = at("k", attn.k_proj(x).view(rows, n, -1, d))
        v = at("v", attn.v_proj(x).view(rows, n, -1, d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # rows head pos d
        if self.is_gemma:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self._rotary(layer, h, start, n)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if keep_kv is not None:
            keep_kv.append((k, v))
        if past is not None and start > 0:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        n_heads, n_kv = q.shape[1], k.shape[1]
        group = n_heads // n_kv
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        # Gemma-2 soft-caps attention scores; Gemma-3's HF attention keeps ``attn_logit_softcapping`` in
        # its config but never applies it (transformers 5.x), so neither do we: the runner follows the
        # module it runs (tests/unit/circuits/test_gemma_engine.py checks this against the HF forward).
        cap = None if self.is_gemma else getattr(attn, "attn_logit_softcapping", None)
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        scores = scores + _mask(start, n, k.shape[2], self._window(layer), h.device, scores.dtype)
        pattern = at("pattern", torch.softmax(scores.float(), dim=-1).to(q.dtype))
        z = at("z", (pattern @ v).transpose(1, 2))  # rows pos head d_head
        attn_out = attn.o_proj(z.reshape(rows, n, -1))
        if self.is_gemma:
            attn_out = blk.post_attention_layernorm(attn_out)
        attn_out = at("attn_out", attn_out)
        mid = at("resid_mid", h + attn_out)
        if self.is_gemma:
            mlp_out = blk.post_feedforward_layernorm(blk.mlp(blk.pre_feedforward_layernorm(mid)))
        else:
            mlp_out = blk.mlp(blk.post_attention_layernorm(mid))
        mlp_out = at("mlp_out", mlp_out)
        return at("resid_post", mid + mlp_out)

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
            if kind not in LAYER_KINDS:
                raise ShapeError(f"cannot record {kind!r}; expected one of {', '.join(LAYER_KINDS)}")
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


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _mask(start: int, n: int, total: int, window: int | None, device, dtype) -> Tensor:
    """Additive causal (and sliding-window) mask of queries ``start..start+n-1`` over keys ``0..total-1``."""
    qpos = torch.arange(start, start + n, device=device)[:, None]
    kpos = torch.arange(total, device=device)[None]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return torch.zeros(n, total, device=device, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
