"""Layer atlas: for one layer, what every analysis found there, and its weights' geometry vs directions."""

from __future__ import annotations

import streamlit as st

from app import common
from tunelens.errors import TunelensError
from tunelens.faces import catalog
from tunelens.faces.atlas import AtlasConfig, atlas_from_folder, default_path


@st.cache_data(show_spinner="Computing the atlas (SVD of the layer's matrices) ...", max_entries=32)
def _compute(spec: tuple[str, str], layer: int, k: int, results_dir: str, stamp: tuple):
    """The atlas of one layer; the decompositions and loaded results are kept in the app's atlas cache, so
    the next layer or another k reuses them."""
    pair = common.load_pair(spec[0], spec[1] or "")
    return atlas_from_folder(pair, AtlasConfig(layer=layer, k=k), results_dir, cache=common.atlas_cache())


st.title("Layer atlas")
st.caption(catalog.BY_KEY["atlas"].about)
entries = common.scan()
if entries is None:
    st.stop()
pair = common.current_pair()
saved = {e.name: e for e in catalog.by_analysis(entries, "atlas")}
n_layers = pair.dims.n_layers if pair is not None else None
if n_layers is None and not saved:
    st.info(
        "The atlas needs a loaded pair (Pair page) for its weights; no saved atlas is in this results "
        "folder. Produce one with the button here once a pair is loaded, or with "
        "tunelens.faces.atlas.compute_atlas."
    )
    st.stop()

result = None
if pair is not None:
    c1, c2 = st.columns([3, 1])
    layer = c1.slider("Layer", 0, n_layers - 1, min(n_layers - 1, n_layers // 2), key="atlas_layer")
    k = int(c2.number_input("Singular vectors per matrix", 1, 64, 8, key="atlas_k"))
    common.pair_check(entries)  # the atlas leaves those results out and lists them below
    try:
        stamp = tuple((e.name, e.mtime) for e in entries if e.analysis not in ("atlas", "other"))
        result = _compute(tuple(st.session_state["pair_spec"]), layer, k, common.results_dir(), stamp)
    except TunelensError as exc:
        st.error(str(exc))
        st.stop()
    if st.button("Save this atlas into the results folder", key="atlas_save"):
        try:
            st.success(f"saved to {result.save(default_path(common.results_dir(), layer))}")
        except (OSError, TunelensError) as exc:
            st.error(f"could not save: {exc}")
else:
    name = st.selectbox("Saved atlas", list(saved), key="atlas_saved")
    result = common.load(saved[name])

common.show_summary(result.summary())
model = st.radio(
    "Weights",
    ["delta", "tuned", "base"],
    horizontal=True,
    key="atlas_model",
    help="delta = tuned − base: the directions the fine-tune wrote into the layer's matrices",
)
st.plotly_chart(result.figure(model=model), width="stretch", key=f"atlas_fig:{result.layer}:{model}")
if result.skipped:
    with st.expander(f"Directions not compared at layer {result.layer} ({len(result.skipped)})"):
        st.write("\n".join(f"- {s}" for s in result.skipped))
st.subheader(f"What the analyses found at layer {result.layer}")
if not result.findings:
    st.info("No saved result has rows for this layer (or the folder holds no results of this pair).")
for name, frame in result.findings.items():
    st.markdown(f"**{name}**")
    st.dataframe(frame, width="stretch")
with st.expander("Geometry table"):
    st.dataframe(result.best(), width="stretch")
