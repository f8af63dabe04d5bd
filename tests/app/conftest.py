"""A results folder made from a tiny pair saved to disk, as the app and the report would meet it.

The pair is saved with ``save_pretrained`` and loaded back through ``tunelens.load_pair`` (what the app's Pair
page does), so the content hashes the results record are those of the pair the app loads. The results are
computed with the analyses' public functions on that pair; each analysis adds its builder here as it lands.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.results import pair_provenance

ET_PROMPT = "The apple is in Box F . The cup is in Box Q . Box Q contains the"


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
    """Folders of a tiny (base, tuned) pair: 4 layers, so the atlas and the sweeps have some depth."""
    from tunelens.models.tiny import TinyConfig

    base = make_tiny(tiny_tok, cfg=TinyConfig(n_layers=3), name="app-base")
    return save_pair(ModelPair(base, _tuned_copy(base, 1, "app-tuned")), tmp_path_factory.mktemp("app-pair"))


@pytest.fixture(scope="session")
def app_pair(app_pair_dirs) -> ModelPair:
    from tunelens.models.loading import load_pair

    return load_pair(*app_pair_dirs)


@pytest.fixture(scope="session")
def other_pair_results(app_pair, tmp_path_factory) -> Path:
    """A results folder of another pair (the same base with another fine-tune)."""
    from tunelens.atlas import AtlasConfig, compute_atlas

    other = ModelPair(app_pair.base, _tuned_copy(app_pair.base, 7, "other-tuned"), name="other")
    root = tmp_path_factory.mktemp("other-results")
    compute_atlas(other, AtlasConfig(layer=0, k=2)).save(root / "atlas" / "layer00")
    return root


def _patching(pair: ModelPair, root: Path) -> None:
    from circuits.sweeps import SweepConfig, activation_patching
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
    from tunelens.atlas import AtlasConfig, compute_atlas, default_path
    from tunelens.directions import Direction
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


BUILDERS = {"probes": _probes, "patching": _patching, "spectral": _spectral, "atlas": _atlas}


@pytest.fixture(scope="session")
def app_results(app_pair, tmp_path_factory) -> Path:
    """results/ of the tiny pair: one folder per analysis whose public functions exist."""
    root = tmp_path_factory.mktemp("app-results")
    for build in BUILDERS.values():
        build(app_pair, root)
    return root
