"""The probes page: the folder's probes results with summary, figure and table (generic view)."""

from __future__ import annotations

from app import common

common.analysis_page("probes")
