"""The circuit page: the folder's circuit results (summary, figure, table) and faithfulness in both models."""

from __future__ import annotations

import streamlit as st

from app import common

entries = common.analysis_page("circuit")
if len(entries) > 1:
    st.subheader("Faithfulness of each circuit result, side by side")
    st.caption(
        "From the results' headline numbers: accuracy of the full model and of the circuit alone (everything "
        "outside it mean-ablated), and the chance-corrected faithfulness (undefined when the full model is "
        "not above chance)."
    )
    keys = ("model", "scope", "n_heads", "acc_full", "acc_circuit", "chance", "faithfulness")
    table = {k: [str(e.summary.get(k, "")) for e in entries] for k in keys}
    st.dataframe(
        {"result": [e.name for e in entries], **table},
        width="stretch",
        key="circuit_both",
    )
