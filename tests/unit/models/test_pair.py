import copy

import pytest

from tests.conftest import make_tiny
from tunelens.errors import ConfigError, PairIncompatibleError
from tunelens.models.pair import ModelFamily, ModelPair


def test_pair_describes_sources_sizes_and_hashes(tiny_pair):
    d = tiny_pair.describe()
    assert d["dims"]["n_layers"] == 2
    assert d["models"]["base"]["hash"] != d["models"]["tuned"]["hash"]
    assert d["models"]["base"]["source"] == "memory:tiny-base"
    assert [role for role, _ in tiny_pair] == ["base", "tuned"]
    assert tiny_pair["tuned"] is tiny_pair.tuned
    with pytest.raises(ConfigError, match="role"):
        tiny_pair["other"]


def test_identical_weights_hash_equal(tiny_tok):
    a = make_tiny(tiny_tok, seed=4)
    b = make_tiny(tiny_tok, seed=4)
    c = make_tiny(tiny_tok, seed=5)
    assert a.content_hash == b.content_hash != c.content_hash


def test_special_tokens_must_agree(tiny_tok):
    base = make_tiny(tiny_tok)
    other_tok = copy.deepcopy(tiny_tok)
    other_tok.eos_token = "<unk>"
    tuned = make_tiny(other_tok)
    with pytest.raises(PairIncompatibleError, match="eos_token_id"):
        ModelPair(base, tuned)


def test_family_builds_pairs_for_every_variant(tiny_tok):
    base = make_tiny(tiny_tok, name="b")
    fam = ModelFamily(
        base=base, variants={"v1": make_tiny(tiny_tok, seed=1), "v2": make_tiny(tiny_tok, seed=2)}
    )
    pairs = list(fam.pairs())
    assert [p.tuned.content_hash for p in pairs] == [
        fam.variants["v1"].content_hash,
        fam.variants["v2"].content_hash,
    ]
    assert all(p.base is base for p in pairs)
    with pytest.raises(ConfigError, match="no variant"):
        fam.pair("v3")
