"""Fixtures of the probe tests."""

from __future__ import annotations

import pytest
from probe_toys import make_toy

from probes.config import ProbeConfig


@pytest.fixture
def toy():
    return make_toy()


@pytest.fixture
def small_cfg():
    return ProbeConfig(min_test_items=20, tol=1e-8, max_iter=2000)
