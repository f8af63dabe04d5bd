import pytest

from tunelens.dims import ModelDims
from tunelens.errors import SiteError
from tunelens.sites import SITE_KINDS, Site, bridge_hook_name, execution_key, site

SMOL = ModelDims(
    architecture="LlamaForCausalLM",
    n_layers=30,
    d_model=576,
    n_heads=9,
    n_kv_heads=3,
    d_head=64,
    d_mlp=1536,
    d_vocab=49152,
    n_ctx=8192,
)
GEMMA = ModelDims(
    architecture="Gemma3ForCausalLM",
    n_layers=18,
    d_model=640,
    n_heads=4,
    n_kv_heads=1,
    d_head=256,
    d_mlp=2048,
    d_vocab=262144,
    n_ctx=32768,
)


def test_every_kind_parses_and_prints():
    for kind in SITE_KINDS:
        s = Site(kind) if kind == "logits" else Site(kind, 3)
        assert Site.parse(str(s)) == s
    assert Site.parse("z.4.2") == Site("z", 4, 2)


@pytest.mark.parametrize("bad", ["resid", "hook_z", "attn", ""])
def test_unknown_kind_names_the_valid_ones(bad):
    with pytest.raises(SiteError, match="expected one of resid_pre"):
        Site(bad, 0)


def test_layer_and_head_ranges_are_checked_against_the_model():
    with pytest.raises(SiteError, match=r"layers 0\.\.29"):
        site(SMOL, "resid_post", 30)
    with pytest.raises(SiteError, match=r"heads 0\.\.8"):
        site(SMOL, "z", 0, 9)
    # grouped-query attention: k and v count KV heads
    assert site(SMOL, "k", 0, 2).head == 2
    with pytest.raises(SiteError, match=r"kv_heads 0\.\.2"):
        site(SMOL, "v", 0, 3)
    with pytest.raises(SiteError, match=r"kv_heads 0\.\.0"):
        site(GEMMA, "k", 0, 1)
    with pytest.raises(SiteError, match="has no heads"):
        Site("resid_post", 0, 1)
    with pytest.raises(SiteError, match="layer >= 0"):
        Site("z", -1)
    with pytest.raises(SiteError, match="takes no layer"):
        Site("logits", 0)


def test_shapes_follow_the_dimension_vocabulary():
    assert Site("z", 0).shape(SMOL, 2, 5) == (2, 5, 9, 64)
    assert Site("k", 0).shape(SMOL, 2, 5) == (2, 5, 3, 64)
    assert Site("v", 0, 1).shape(SMOL, 2, 5) == (2, 5, 64)
    assert Site("pattern", 0).shape(SMOL, 2, 5) == (2, 9, 5, 5)
    assert Site("attn_out", 0).shape(GEMMA, 1, 3) == (1, 3, 640)
    assert Site("z", 0).head_dim_name == "head" and Site("k", 0).head_dim_name == "kv_head"


def test_hook_names_and_execution_order():
    assert bridge_hook_name(Site("z", 5, 1)) == "blocks.5.attn.hook_z"
    order = sorted(
        [Site("resid_post", 0), Site("resid_pre", 1), Site("z", 0), Site("resid_pre", 0)], key=execution_key
    )
    assert order == [Site("resid_pre", 0), Site("z", 0), Site("resid_post", 0), Site("resid_pre", 1)]
