"""A toy context-vs-prior task for a tiny model: an intent token decides between a context and a memory.

Each object has a fixed box letter (the *prior*, learned in training); the context asserts another
letter; the instruction ``Only consider the context`` asks for the context's letter, ``Ignore the
context`` for the prior. The tiny model is trained from scratch on both intents in a few seconds.
"""

from __future__ import annotations

import random

import torch

from circuits.knob.data import KnobItems
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.tiny import TinyConfig, tiny_family, tiny_llama
from tunelens.tasks.base import answer_token_id, encode_prompts
from tunelens.tasks.entity_tracking import LABELS, OBJECTS

N_OBJECTS = 12
INTENT_TOKEN = {"context": "Only", "prior": "Ignore", None: "context"}


def prompt(obj: str, ctx_label: str, intent: str | None) -> str:
    question = f"Question : The {obj} is in Box ? {INTENT_TOKEN[intent]} :"
    return f"Context : The {obj} is in Box {ctx_label} . {question}"


def prior_map(seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    return {obj: rng.choice(LABELS) for obj in OBJECTS[:N_OBJECTS]}


def toy_items(n: int, seed: int, tok) -> KnobItems:
    """``n`` items (object, counterfactual letter), with prompts of both intents and the 'none' format."""
    rng = random.Random(seed)
    prior = prior_map()
    objs = list(prior)
    ids, ctx, pri, non, cands, answers = [], [], [], [], [], []
    for i in range(n):
        obj = rng.choice(objs)
        cf = rng.choice([x for x in LABELS if x != prior[obj]])
        ids.append(f"toy:{i}")
        ctx.append(prompt(obj, cf, "context"))
        pri.append(prompt(obj, cf, "prior"))
        non.append(prompt(obj, cf, None))
        cands.append((answer_token_id(tok, " " + prior[obj]), answer_token_id(tok, " " + cf)))
        answers.append((prior[obj], cf))
    return KnobItems(
        item_ids=tuple(ids),
        prompt_by_fmt={"context": tuple(ctx), "prior": tuple(pri), "none": tuple(non)},
        candidates=torch.tensor(cands),
        answers=tuple(answers),
    )


def train_toy(tok, steps: int = 400, seed: int = 0, family: str = "llama") -> LoadedModel:
    """A 3-layer tiny model (a Llama, or a random-init model of another declared ``family``) trained from
    scratch to follow the intent (both intents, balanced)."""
    cfg = TinyConfig(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2)
    if family == "llama":
        model = tiny_llama(cfg, len(tok.get_vocab()), seed)
    else:
        model = tiny_family(family, cfg, len(tok.get_vocab()), seed)
    items = toy_items(512, seed + 100, tok)
    tokens = encode_prompts(tok, items.prompts("context") + items.prompts("prior"))
    labels = torch.cat([items.candidates[:, 1], items.candidates[:, 0]])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(labels), (32,), generator=gen)
        ids, mask = tokens.input_ids[idx], tokens.attention_mask[idx]
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        loss = torch.nn.functional.cross_entropy(logits[torch.arange(len(idx)), last], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    name = "tiny-knob" if family == "llama" else f"tiny-knob-{family}"
    return LoadedModel(model, tok, source=ModelSource(kind="memory", location=name), name=name)
