"""Jobs: the batch jobs in the results folder, their progress and results."""

from __future__ import annotations

import streamlit as st

from app import common, live

st.title("Jobs")
st.caption(
    "Batch jobs (`tunelens jobs run JOB.yaml`) write their progress and results into a results folder."
)
entries = common.scan()
if entries is None:
    st.stop()
status = live.optional("tunelens.faces.jobs", "folder_status")
if status is None:
    st.info(
        "This install has no batch-job status API yet (tunelens.faces.jobs); "
        "the folder's results are listed below."
    )
else:
    try:
        st.dataframe(status(common.results_dir()), width="stretch")
    except Exception as exc:  # shown, not swallowed
        st.error(f"{type(exc).__name__}: {exc}")
st.subheader("Results in the folder")
if entries:
    st.dataframe(
        {
            "result": [e.name for e in entries],
            "analysis": [e.analysis for e in entries],
            "type": [e.class_name for e in entries],
            "pair": [e.pair.get("name", "") for e in entries],
        },
        width="stretch",
    )
else:
    st.info(
        f"No results in `{common.results_dir()}` yet. Produce them with "
        f"`tunelens demo --out {common.results_dir()}`."
    )
