"""Torch's intra-op thread count, pinned for the duration of a block and restored after.

Small CPU problems run faster on one thread (two OpenMP threads on a busy machine spin waiting for a core),
and a computation whose result depends on float summation order is reproducible only at a fixed count.
Torch's thread count is process-wide: other threads running torch inside the block run at it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread for the duration (restored after, also after an exception)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
