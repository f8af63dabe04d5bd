"""Entity tracking (Kim & Schuster 2023; Prakash et al. 2024): which object is in the queried box?

    The apple is in Box F. The cup is in Box Q. The dog is in Box B. Box Q contains the  ->  " cup"

A *context* (a world) assigns distinct objects to distinct single-letter boxes; every box of it can be
queried, and all queries of a context share one ``item_id``, so splits never leak a world. Accuracy is
restricted to the context's objects (chance ``1 / n_boxes``); full-vocabulary argmax is reported too.

Marks (turned into token positions by :meth:`Dataset.encode`): ``query_label`` (the box letter of the
query, ``last − 2`` in the paper), ``prev_query_label`` (the same letter inside the context),
``query_object`` (the answer inside the context), and ``label_i`` / ``object_i`` per segment ``i``. The
``context`` counterfactual also marks ``random_label``: one of its box labels, drawn at random (the paper's
corrupt sender position for the structure-reader step, whose query names no box of that world).

Example:
    >>> ds = generate(EntityTrackingConfig(n_boxes=3, n_contexts=2), seed=0)
    >>> len(ds), ds.examples[0].prompt.endswith("contains the")
    (6, True)
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Literal

from tunelens.errors import ConfigError
from tunelens.tasks.base import Dataset, Example

# Common nouns and capital letters that are single tokens (with a leading space) for SmolLM2 and Gemma-3.
OBJECTS: tuple[str, ...] = (
    "apple", "bag", "ball", "bell", "book", "bottle", "box", "bread", "brush", "cake", "camera", "card",
    "chair", "clock", "coat", "coin", "cup", "dog", "doll", "drum", "egg", "fan", "file", "fish", "flower",
    "glass", "hat", "key", "kite", "lamp", "letter", "map", "milk", "phone", "pen", "plate", "ring", "rock",
    "shoe", "sock", "spoon", "stone", "toy", "watch",
)  # fmt: skip
LABELS: tuple[str, ...] = tuple("BCDEFGHJKLMNPQRSTVWXZ")

Counterfactual = Literal["query", "context"]


@dataclass(frozen=True, kw_only=True)
class EntityTrackingConfig:
    """How many boxes and worlds, and which words fill them."""

    n_boxes: int = 3
    n_contexts: int = 100
    objects: tuple[str, ...] = OBJECTS
    labels: tuple[str, ...] = LABELS

    def __post_init__(self) -> None:
        if not 2 <= self.n_boxes <= min(len(self.objects), len(self.labels)):
            raise ConfigError(
                f"n_boxes must be in 2..{min(len(self.objects), len(self.labels))}, got {self.n_boxes}"
            )
        if self.n_contexts < 1:
            raise ConfigError(f"n_contexts must be >= 1, got {self.n_contexts}")
        if len(set(self.objects)) != len(self.objects) or len(set(self.labels)) != len(self.labels):
            raise ConfigError("objects and labels must be unique")


def _context(rng: random.Random, cfg: EntityTrackingConfig) -> tuple[list[str], list[str]]:
    return rng.sample(list(cfg.objects), cfg.n_boxes), rng.sample(list(cfg.labels), cfg.n_boxes)


def render(objects: list[str], labels: list[str], query_label: str) -> tuple[str, dict[str, int]]:
    """The prompt and its marks (character offsets) for one context and one query."""
    text, marks = "", {}
    for i, (obj, lab) in enumerate(zip(objects, labels, strict=True)):
        seg = f"The {obj} is in Box "
        marks[f"object_{i}"] = len(text) + 4
        marks[f"label_{i}"] = len(text) + len(seg)
        text += seg + lab + ". "
        if lab == query_label:
            marks["prev_query_label"] = marks[f"label_{i}"]
            marks["query_object"] = marks[f"object_{i}"]
    marks["query_label"] = len(text) + 4
    text += f"Box {query_label} contains the"
    return text, marks


def _example(objects: list[str], labels: list[str], q: int, item_id: str, **meta) -> Example:
    query = labels[q] if q >= 0 else meta["query_label"]
    prompt, marks = render(objects, labels, query)
    answer = objects[q] if q >= 0 else objects[0]
    return Example(
        prompt=prompt,
        answer=" " + answer,
        candidates=tuple(" " + o for o in objects),
        item_id=item_id,
        label=answer if q >= 0 else None,
        marks=marks,
        meta={"objects": tuple(objects), "labels": tuple(labels), "query_index": q, **meta},
    )


def generate(cfg: EntityTrackingConfig, seed: int) -> Dataset:
    """Every box of ``cfg.n_contexts`` random worlds queried once, reproducibly from ``seed``."""
    rng = random.Random(seed)
    examples = []
    for c in range(cfg.n_contexts):
        objects, labels = _context(rng, cfg)
        for q in range(cfg.n_boxes):
            examples.append(_example(objects, labels, q, f"et:{seed}:{c}"))
    return Dataset(task="entity_tracking", config={**asdict(cfg), "seed": seed}, examples=tuple(examples))


def counterfactuals(clean: Dataset, kind: Counterfactual, seed: int) -> Dataset:
    """A corrupted twin of every clean example, of the same token length.

    ``query``: the same world, another box queried (the answer changes to that box's object).
    ``context``: the paper's path-patching corruption — another world, with the query's box letter
    replaced by a letter that names no box (so the corrupt run carries "no valid answer"). Each such prompt
    also marks ``random_label``, a box label of its world drawn at random (from a separate generator, so
    the prompts themselves do not depend on it).
    """
    if kind not in ("query", "context"):
        raise ConfigError(f"counterfactual kind must be 'query' or 'context', got {kind!r}")
    rng = random.Random(seed)
    pick = random.Random(f"random_label:{seed}")
    cfg = clean.config
    out = []
    for e in clean.examples:
        objects, labels, q = list(e.meta["objects"]), list(e.meta["labels"]), e.meta["query_index"]
        if kind == "query":
            other = rng.choice([i for i in range(len(objects)) if i != q])
            out.append(_example(objects, labels, other, e.item_id, clean_query_index=q))
        else:
            objs = rng.sample(list(cfg["objects"]), len(objects))
            labs = rng.sample(list(cfg["labels"]), len(labels))
            free = [x for x in cfg["labels"] if x not in labs]
            bad = _example(objs, labs, -1, e.item_id, query_label=rng.choice(free))
            i = pick.randrange(len(labs))
            out.append(replace(bad, marks={**bad.marks, "random_label": bad.marks[f"label_{i}"]}))
    return Dataset(task="entity_tracking", config={**cfg, "counterfactual": kind}, examples=tuple(out))
