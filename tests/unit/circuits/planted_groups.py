"""A 4-layer toy with the entity-tracking circuit's four head groups planted by hand in its weights.

The residual stream is split into subspaces: ``E`` (dims 0..15, the embeddings, the only part the
unembedding reads), ``SD``, ``SC``, ``SB`` (one per planted head's output) and ``JUNK`` (40..63, where
every other head writes and which nothing reads). Norms are made linear and the MLPs silent, so a head
reaches another only through the subspace planted between them:

* layer 0, head ``D`` (structure reader): values read ``E``, writes ``SD``;
* layer 1, head ``C`` (position detector): values read ``SD`` and ``E``, writes ``SC``;
* layer 2, head ``B`` (position transmitter): values read ``SC`` and ``E``, writes ``SB``;
* layer 3, head ``A`` (value fetcher): queries read ``SB`` and ``E``, values ``E``, writes ``E``.

So the only path into the logits is ``A``; into ``A``'s queries ``B``; into ``B``'s values ``C``; into
``C``'s values ``D``: the groups the search must find, each at its own step.
"""

from __future__ import annotations

import torch

from tests.conftest import make_tiny
from tunelens.models.loaded import LoadedModel
from tunelens.models.tiny import TinyConfig

DH = 16
E, SD, SC, SB = slice(0, 16), slice(16, 24), slice(24, 32), slice(32, 40)
PLANTED = {
    "value_fetcher": (3, 3),
    "position_transmitter": (2, 0),
    "position_detector": (1, 2),
    "structure_reader": (0, 1),
}
WRITES = {0: (1, SD), 1: (2, SC), 2: (0, SB), 3: (3, E)}  # layer -> (planted head, its subspace)
VALUE_READS = {0: [E], 1: [SD, E], 2: [SC, E], 3: [E]}  # the planted head's KV group reads these


def _keep(w: torch.Tensor, rows: slice, cols: list[slice]) -> None:
    """Zero the columns of ``w[rows]`` outside ``cols``."""
    mask = torch.zeros(w.shape[1], dtype=torch.bool)
    for c in cols:
        mask[c] = True
    w[rows, ~mask] = 0


def planted_model(tok, seed: int = 0) -> LoadedModel:
    model = make_tiny(
        tok, seed=seed, cfg=TinyConfig(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2), name="planted-groups"
    )
    hf = model.hf
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 16:] = 0
        hf.model.embed_tokens.weight[:, :16] = torch.randn(
            hf.model.embed_tokens.weight.shape[0], 16, generator=gen
        )
        _keep(hf.lm_head.weight, slice(None), [E])
        hf.lm_head.weight[:, E] = torch.randn(hf.lm_head.weight.shape[0], 16, generator=gen)
        for norm in [*(layer.input_layernorm for layer in hf.model.layers), hf.model.norm]:
            norm.variance_epsilon = 1e8  # x · w / sqrt(mean x² + eps) = x when w = sqrt(eps)
            norm.weight.fill_(1e4)
        for lay, layer in enumerate(hf.model.layers):
            layer.mlp.down_proj.weight.zero_()
            att = layer.self_attn
            head, out = WRITES[lay]
            group = head // 2
            for w in (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight):
                _keep(w, slice(None), [E])  # by default every head reads the embeddings only
            att.v_proj.weight[group * DH : (group + 1) * DH] = 0.5 * torch.randn(DH, 64, generator=gen)
            _keep(att.v_proj.weight, slice(group * DH, (group + 1) * DH), VALUE_READS[lay])
            if lay == 3:
                rows = slice(head * DH, (head + 1) * DH)
                att.q_proj.weight[rows] = 0.5 * torch.randn(DH, 64, generator=gen)
                _keep(att.q_proj.weight, rows, [SB, E])
            o = att.o_proj.weight  # d_model × (head d_head)
            for h in range(4):
                cols = slice(h * DH, (h + 1) * DH)
                o[:, cols] = 0
                if h == head:
                    o[out, cols] = torch.randn(out.stop - out.start, DH, generator=gen) * (
                        2.0 if lay == 3 else 1.0
                    )
                else:  # a distractor: writes where nothing reads
                    o[40:, cols] = torch.randn(24, DH, generator=gen)
    return model
