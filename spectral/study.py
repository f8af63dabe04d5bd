"""The weight-space studies on SmolLM2: reduced in ``tunelens demo``, full in ``tunelens reproduce``.

1. **Spectra and intruders over the entity-tracking family** (``zoo.FAMILIES["smollm2-et"]``: LoRA r=1, 8,
   64 and a full fine-tune of the same task), with ``rotated`` / ``rank1`` noise baselines; optionally the
   same on extrapolated updates ``W0 + α·ΔW`` (how large must these updates get before intruders appear?).
2. **The λ causal test** on the variants: intruder components scaled by λ, task accuracy on held-out
   entity tracking (``zoo.recipe_data``'s test split) vs loss on the base model's own samples
   (:mod:`spectral.drift`).
3. **Grafting** the full fine-tune ``smollm2-et-full`` (sparsity curve, baselines, ECE, per-layer map) and
   the two-task fine-tune ``smollm2-mix-full`` (one mask per task, overlap).

Each part saves a Result under ``out/spectral/<name>`` and the functions return headline numbers.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from spectral.drift import GeneralTextConfig, base_samples
from spectral.graft import GraftConfig, graft
from spectral.intruders import IntruderConfig, intruder_family, intruder_tradeoff
from spectral.spectra import SpectrumConfig, SpectrumResult
from tunelens.models import zoo
from tunelens.studies import Study

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class StudySettings:
    """What the study runs; the demo and reproduce differ only here."""

    family: str = "smollm2-et"
    variants: tuple[str, ...] | None = None  # a subset of the family's variants (None: all of them)
    intruders: IntruderConfig = field(default_factory=IntruderConfig)
    extrapolate: tuple[float, ...] = ()  # α values for W0 + α·ΔW (empty: skip)
    tradeoff_variants: tuple[str, ...] = ("smollm2-et-lora-r1", "smollm2-et-lora-r64", "smollm2-et-full")
    tradeoff_epsilons: tuple[float, ...] = (0.5, 0.9)
    lambdas: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5)
    max_task: int = 180
    general: GeneralTextConfig = field(default_factory=GeneralTextConfig)
    graft_pair: str = "smollm2-et-full"
    graft: GraftConfig = field(default_factory=GraftConfig)
    graft_max_test: int = 180
    mix_pair: str | None = "smollm2-mix"
    mix_sparsities: tuple[float, ...] = (1e-3,)


DEMO_SETTINGS = StudySettings(
    # The demo's family is the LoRA r=8 of the demo pair and the full fine-tune (two short builds);
    # ranks 1 and 64 and the MLP matrices are in reproduce.
    variants=("smollm2-et-lora-r8", "smollm2-et-full"),
    intruders=IntruderConfig(kinds=("q", "k", "v", "o"), baselines=("rank1",)),
    tradeoff_variants=("smollm2-et-lora-r8",),
    tradeoff_epsilons=(0.9,),
    lambdas=(0.0, 1.0),
    max_task=60,
    general=GeneralTextConfig(n_prompts=8, new_tokens=24),
    graft=GraftConfig(sparsities=(1e-2,), steps=2, max_fit=32, max_dev=16, batch_size=32),
    graft_max_test=60,
    mix_pair=None,
)
REPRODUCE_SETTINGS = StudySettings(
    extrapolate=(4.0, 16.0),
    graft=GraftConfig(sparsities=(1e-4, 1e-3, 1e-2), steps=6, max_fit=64, max_dev=32),
)


def _trim(data: dict, n: int) -> dict:
    return {k: (v.subset(range(min(n, len(v)))) if k.startswith("test") else v) for k, v in data.items()}


def _build(name: str, progress: Progress) -> None:
    """Build a zoo model this study needs (once; a no-op when it is built)."""
    if not zoo.is_built(name):
        progress(f"building zoo model {name} (once)")
        zoo.build(name, progress=lambda msg: progress("  " + msg))


def run_intruders(out: Path, s: StudySettings, progress: Progress) -> dict[str, Any]:
    """Spectra, intruders (with baselines and the λ test) over the family; saves three results."""
    base_name, all_variants = zoo.FAMILIES[s.family]
    names = s.variants or all_variants
    for name in (base_name, *names):
        _build(name, progress)
    base = zoo.load(base_name)
    variants = {v: zoo.load(v) for v in names}
    res, passed = intruder_family(base, variants, s.intruders, progress=progress, keep_vectors=True)
    spec = SpectrumResult(
        config=SpectrumConfig(kinds=s.intruders.kinds, layers=s.intruders.layers),
        variants=res.variants,
        matrices=res.matrices,
        base_sigma=passed.base_sigma,
        delta_sigma=torch.stack([passed.delta_sigma[v] for v in res.variants]),
        provenance=res.provenance,
    )
    spec.save(out / "spectra")
    headline: dict[str, Any] = {"spectra": spec.summary()}
    if s.tradeoff_variants:
        progress("intruders: sampling general text from the base model")
        general = base_samples(base, s.general)
        task = zoo.recipe_data(zoo.entry(s.tradeoff_variants[0]).recipe, base)["test"]
        task = task.subset(range(min(s.max_task, len(task)))).encode(base.tokenizer)
        models = {v: variants[v] for v in s.tradeoff_variants}
        res = intruder_tradeoff(
            res,
            passed,
            models,
            task,
            general,
            lambdas=s.lambdas,
            epsilons=s.tradeoff_epsilons,
            progress=progress,
        )
    res.save(out / "intruders")
    headline["intruders"] = res.summary()
    headline["intruders"]["counts_eps0.9"] = res.counts(epsilon=0.9)
    if s.extrapolate:
        scaled = {f"{v} x{a:g}": m for a in s.extrapolate for v, m in variants.items()}
        scales = {f"{v} x{a:g}": a for a in s.extrapolate for v in variants}
        ext = intruder_family(
            base, scaled, replace(s.intruders, baselines=("rotated",)), scales=scales, progress=progress
        )
        ext.save(out / "intruders_extrapolated")
        headline["intruders_extrapolated"] = ext.counts()
    del base, variants, passed
    gc.collect()
    return headline


def run_grafts(out: Path, s: StudySettings, progress: Progress) -> dict[str, Any]:
    """Graft the full fine-tune (curve, baselines, ECE, layer map) and the two-task fine-tune (overlap)."""
    headline: dict[str, Any] = {}
    for name in zoo.PAIRS[s.graft_pair]:
        _build(name, progress)
    pair = zoo.load_pair(s.graft_pair)
    data = _trim(zoo.recipe_data(zoo.entry(pair.tuned.name).recipe, pair.base), s.graft_max_test)
    res = graft(pair, {"entity_tracking": data}, s.graft, progress=progress)
    res.save(out / "graft")
    headline["graft"] = res.summary()
    del pair
    gc.collect()
    if s.mix_pair:
        for name in zoo.PAIRS[s.mix_pair]:
            _build(name, progress)
        pair = zoo.load_pair(s.mix_pair)
        et = zoo.recipe_data(zoo.TaskRecipe(task="entity_tracking", n=200), pair.base)
        knob = zoo.recipe_data(zoo.TaskRecipe(task="context_knob", n=0), pair.base)
        tasks = {
            "entity_tracking": _trim(et, s.graft_max_test),
            "context_knob": _trim({"train": knob["train"], "test": knob["test"]}, s.graft_max_test),
        }
        cfg = replace(s.graft, sparsities=s.mix_sparsities)
        mix = graft(pair, tasks, cfg, progress=progress)
        mix.save(out / "graft_mixture")
        headline["graft_mixture"] = mix.summary()
        del pair
        gc.collect()
    return headline


def run_study(out: Path, settings: StudySettings, *, progress: Progress = log.info) -> dict[str, Any]:
    out = Path(out)
    t0 = time.time()
    headline = run_intruders(out, settings, progress)
    t1 = time.time()
    headline |= run_grafts(out, settings, progress)
    headline["seconds"] = {"intruders": round(t1 - t0, 1), "grafts": round(time.time() - t1, 1)}
    return headline


STUDIES: tuple[Study, ...] = (
    Study(
        key="spectral",
        title="Weight space: intruder dimensions with baselines and the λ test, skill localisation",
        pair=None,  # it reads the zoo's SmolLM2 family and fine-tunes itself
        models=(*zoo.FAMILIES["smollm2-et"][1], *zoo.PAIRS["smollm2-mix"]),
        run=run_study,
        demo=DEMO_SETTINGS,
        full=REPRODUCE_SETTINGS,
    ),
)
