"""The circuit page: the folder's circuit results with summary, figure and table (generic view)."""

from __future__ import annotations

from app import common

common.analysis_page("circuit")
