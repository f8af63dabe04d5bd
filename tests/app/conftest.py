"""A results folder made from a tiny pair saved to disk, as the app and the report would meet it.

The pair is saved with ``save_pretrained`` and loaded back through ``tunelens.load_pair`` (what the app's Pair
page does), so the content hashes the results record are those of the pair the app loads. The results are
computed with the analyses' public functions on that pair; each analysis adds its builder here as it lands.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.models.tiny import TinyConfig
from tunelens.results import pair_provenance
from tunelens.threads import one_thread

ET_PROMPT = "The apple is in Box F . The cup is in Box Q . Box Q contains the"
TOY_STEPS = 400
TOY_CONFIG = TinyConfig(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2)  # knob_toy.train_toy's model


def save_pair(pair: ModelPair, root: Path) -> tuple[str, str]:
    dirs = []
    for role, m in pair:
        d = root / role
        m.module.save_pretrained(d)
        m.tokenizer.save_pretrained(d)
        dirs.append(str(d))
    return dirs[0], dirs[1]


def _tuned_copy(base: LoadedModel, seed: int, name: str) -> LoadedModel:
    module = copy.deepcopy(base.module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return LoadedModel(module, base.tokenizer, source=ModelSource(kind="memory", location=name), name=name)


@pytest.fixture(scope="session")
def app_pair_dirs(tiny_tok, tmp_path_factory) -> tuple[str, str]:
    """Folders of a tiny (base, tuned) pair with a skill to find: the tuned model is the base (an untrained
    3-layer tiny Llama) trained for seconds on the toy context-vs-prior task of
    tests/unit/circuits/knob_toy.py, so the knob, the graft and CMAP have a real fine-tune to work on.

    ``TUNELENS_APP_FAMILY=gpt2`` (any declared family) runs the app tier on a toy of that family instead."""
    from tests.unit.circuits.knob_toy import train_toy
    from tunelens.models.tiny import tiny_family, tiny_llama

    family = os.environ.get("TUNELENS_APP_FAMILY", "llama")
    with one_thread():  # the toy's training depends on float summation order
        tuned = train_toy(tiny_tok, steps=TOY_STEPS, seed=0, family=family)
    vocab = len(tiny_tok.get_vocab())  # the base: train_toy's initial weights
    base_module = (
        tiny_llama(TOY_CONFIG, vocab, 0) if family == "llama" else tiny_family(family, TOY_CONFIG, vocab, 0)
    )
    base = LoadedModel(base_module, tiny_tok, source=ModelSource(kind="memory", location="app-base"))
    return save_pair(ModelPair(base, tuned), tmp_path_factory.mktemp("app-pair"))


@pytest.fixture(scope="session")
def app_pair(app_pair_dirs) -> ModelPair:
    from tunelens.models.resolve import load_pair

    return load_pair(*app_pair_dirs)


@pytest.fixture(scope="session")
def other_pair_results(app_pair, tmp_path_factory) -> Path:
    """A results folder of another pair (the same base with another fine-tune)."""
    from tunelens.faces.atlas import AtlasConfig, compute_atlas

    other = ModelPair(app_pair.base, _tuned_copy(app_pair.base, 7, "other-tuned"), name="other")
    root = tmp_path_factory.mktemp("other-results")
    compute_atlas(other, AtlasConfig(layer=0, k=2)).save(root / "atlas" / "layer00")
    return root


def _patching(pair: ModelPair, root: Path) -> None:
    from circuits.patching.sweeps import SweepConfig, activation_patching
    from tunelens.tasks import entity_tracking as et

    clean = et.generate(et.EntityTrackingConfig(n_boxes=2, n_contexts=3), seed=0)
    corrupt = et.counterfactuals(clean, "query", seed=1)
    enc_c, enc_x = clean.encode(pair.tokenizer), corrupt.encode(pair.tokenizer)
    for by, kind in (("layer_pos", "resid_pre"), ("layer_head", "z")):
        res = activation_patching(
            pair.tuned, enc_c, enc_x, SweepConfig(kind=kind, by=by), provenance=pair_provenance(pair)
        )
        res.save(root / "patching" / f"{kind}_{by}")


def _atlas(pair: ModelPair, root: Path) -> None:
    from tunelens.directions import Direction
    from tunelens.faces.atlas import AtlasConfig, compute_atlas, default_path
    from tunelens.sites import Site

    gen = torch.Generator().manual_seed(0)
    dirs = [
        Direction(
            site=Site("resid_mid", 1), vector=torch.randn(pair.dims.d_model, generator=gen), name="probe"
        ),
        Direction(
            site=Site("resid_post", 1), vector=torch.randn(pair.dims.d_model, generator=gen), name="knob"
        ),
    ]
    compute_atlas(pair, AtlasConfig(layer=1, k=4), directions=dirs).save(default_path(root, 1))


def _probes(pair: ModelPair, root: Path) -> None:
    """Binary probes (is the queried box the first one?) on resid_mid and resid_post of every layer."""
    from probes.config import ProbeConfig
    from probes.fit import fit_probes
    from tunelens.cache import CacheConfig, capture_pair
    from tunelens.sites import all_layers
    from tunelens.tasks import entity_tracking as et

    data = et.generate(et.EntityTrackingConfig(n_boxes=2, n_contexts=40), seed=0)
    labels = torch.tensor([int(e.meta["query_index"] == 0) for e in data.examples])
    items = [e.item_id for e in data.examples]
    for kind in ("resid_mid", "resid_post"):
        sites = tuple(all_layers(pair.dims, kind))
        acts = capture_pair(pair, data, CacheConfig(sites=sites, positions="last"))
        stacked = {role: torch.stack([a[s] for s in sites]) for role, a in acts.items()}
        cfg = ProbeConfig(kind="logistic", min_test_items=5, control=False)
        res = fit_probes(
            stacked, labels, items, cfg, pair=pair_provenance(pair), site_kind=kind, task="et-first-box"
        )
        res.save(root / "probes" / kind)


def _spectral(pair: ModelPair, root: Path) -> None:
    from spectral.intruders import intruders
    from spectral.spectra import spectra

    intruders(pair).save(root / "intruders")
    spectra(pair.base, {"tuned": pair.tuned}).save(root / "spectra")


def _toy_items(tok, n: int, seed: int):
    from tests.unit.circuits.knob_toy import toy_items

    return toy_items(n, seed, tok)


def _knob(pair: ModelPair, root: Path) -> None:
    """The context knob on the toy task (held-out toy items, a short DAS, two set-points)."""
    from circuits.knob.analysis import KnobConfig, run_knob
    from circuits.knob.das import DASConfig

    items = _toy_items(pair.tokenizer, 40, 11).split({"knob": 0.5, "test": 0.5}, seed=0)
    cfg = KnobConfig(
        das=DASConfig(epochs=4, lr=0.05), dose_ts=(-1.0, 2.0), transfer_step=2, n_generate=1, max_new_tokens=2
    )
    with one_thread():
        run_knob(pair, cfg, items=items).save(root / "knob")


def _graft(pair: ModelPair, root: Path) -> None:
    """Grafts of the toy fine-tune for its two intents (two tasks: overlap and cross views exist)."""
    from spectral.graft import GraftConfig, graft
    from tunelens.tasks.base import Dataset, Example

    items = _toy_items(pair.tokenizer, 48, 21)

    def task(fmt: str, col: int):
        examples = tuple(
            Example(prompt=p, answer=" " + a[col], candidates=(" " + a[0], " " + a[1]), item_id=i)
            for p, a, i in zip(items.prompts(fmt), items.answers, items.item_ids, strict=True)
        )
        return Dataset(task=f"toy-{fmt}", config={}, examples=examples).split(
            {"train": 0.6, "test": 0.4}, seed=0
        )

    cfg = GraftConfig(sparsities=(0.01, 0.1), steps=2, max_fit=16, max_dev=8, step_size=20.0)
    tasks = {"context": task("context", 1), "prior": task("prior", 0)}
    graft(pair, tasks, cfg).save(root / "skills" / "graft")


def _circuits(pair: ModelPair, root: Path) -> None:
    """The demo's circuits study (residual patching, CMAP sweeps and groups, attribution) at toy size, then
    the circuit's faithfulness in both models from the saved CMAP sweeps, as the demo does."""
    from circuits.circuit.faithfulness import faithfulness
    from circuits.studies.circuit import cmap_heads
    from circuits.studies.entity_tracking import StudySettings, run_study
    from tunelens.tasks import entity_tracking as et

    run_study(pair, StudySettings(n_contexts=2, resid_contexts=1, top_k=2, n_random=2), root / "circuits")
    data = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=2), 0).encode(pair.tokenizer)
    reference = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=2), 100).encode(pair.tokenizer)
    groups, checked = cmap_heads(pair, data, top_k=2, saved=root / "circuits")
    prov = pair_provenance(pair)
    for role in ("tuned", "base"):
        faithfulness(
            pair[role], data, groups, reference=reference, n_random=2, n_candidates_checked=checked,
            provenance={**prov, "role": role},
        ).save(root / "circuit" / f"faithfulness_{role}_all")  # fmt: skip


BUILDERS = {
    "probes": _probes,
    "patching": _patching,
    "spectral": _spectral,
    "atlas": _atlas,
    "knob": _knob,
    "skills": _graft,
    "circuits": _circuits,
}


@pytest.fixture(scope="session")
def app_results(app_pair, tmp_path_factory) -> Path:
    """results/ of the tiny pair: one folder per analysis whose public functions exist."""
    root = tmp_path_factory.mktemp("app-results")
    for build in BUILDERS.values():
        build(app_pair, root)
    return root


# -- a results folder holding batch jobs, run through the real job runner --------------------------------
PROBE_JOB_UNITS = {  # unit -> the state the job_results fixture leaves it in
    "cache": "done",
    "probe-logistic-resid_post-seed0": "done",
    "probe-logistic-resid_post-seed1": "failed",
    "probe-diff_means-resid_post-seed0": "done",
    "probe-diff_means-resid_post-seed1": "pending",
}


class _Interrupted(Exception):
    """The job stopped from outside (as a Ctrl-C would stop it) after a unit finished."""


@pytest.fixture(scope="session")
def job_results(app_pair_dirs, tmp_path_factory) -> Path:
    """A results folder with two batch jobs, each in its own subfolder, as ``tunelens jobs run`` and
    ``tunelens reproduce`` leave them:

    * ``probe-job/``: a small probe job on the app's pair (a cache unit, then two probe kinds x two seeds),
      run by the job runner with one unit failing (the runner's fault-injection hook) and the run stopped
      after the fourth unit, so its units are done, failed and pending (:data:`PROBE_JOB_UNITS`);
    * ``reproduce/``: ``tunelens reproduce --only environment``, finished.
    """
    from tunelens.faces.jobs import JobSpec, plan_job
    from tunelens.faces.jobs.faults import FAIL_ENV
    from tunelens.faces.jobs.reproduce import reproduce_plan
    from tunelens.faces.jobs.runner import run_plan

    root = tmp_path_factory.mktemp("job-results")
    spec = JobSpec.from_dict(
        {
            "kind": "probe",
            "output": str(root / "probe-job"),
            "pair": {"base": app_pair_dirs[0], "tuned": app_pair_dirs[1]},
            "task": {"name": "entity_tracking", "n": 60, "seed": 0, "label": "query_is_first"},
            "sites": ["resid_post"],
            "probes": ["logistic", "diff_means"],
            "seeds": [0, 1],
            "probe": {"min_test_items": 5},
            "cache": {"shard_size": 16, "batch_size": 16},
        },
        source="tests/app/conftest.py",
    )

    def stop_after(event) -> None:
        if event.state == "done" and event.unit.id == "probe-diff_means-resid_post-seed0":
            raise _Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAIL_ENV, "probe-logistic-resid_post-seed1:9")
        with pytest.raises(_Interrupted):
            run_plan(plan_job(spec), retries=0, progress=stop_after)
    report = run_plan(reproduce_plan(root / "reproduce", ["environment"]))
    assert report.done == ["study-environment"]
    return root
