"""tunelens: what did fine-tuning change inside this model?

The one Python API for notebooks and scripts::

    import tunelens as tl

    pair = tl.load_pair("smollm2-et")              # a zoo pair, or tl.load_pair(base_ref, tuned_ref)
    batch = pair.base.encode(["The capital of France is"])
    out = pair.tuned.backend("bridge").run(batch, reads=[tl.Site("resid_post", 10)])
"""

from tunelens.errors import TunelensError
from tunelens.models.pair import ModelFamily, ModelPair
from tunelens.models.resolve import load_model, load_pair
from tunelens.sites import Site

__all__ = ["ModelFamily", "ModelPair", "Site", "TunelensError", "load_model", "load_pair"]
__version__ = "0.1.0"
