"""The intruders page: the folder's intruders results with summary, figure and table (generic view)."""

from __future__ import annotations

from app import common

common.analysis_page("intruders")
