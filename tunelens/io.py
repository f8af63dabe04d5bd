"""Atomic file writes and digests: the one way tunelens puts a file on disk.

Every result, manifest, shard and job record goes through :func:`atomic_write`: a temp file in the
destination folder, fsync, ``os.replace``, fsync of the folder. A crash (a kill signal, a full disk) leaves
either the old file or the new one, never half of one, and no temp file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def atomic_write(
    dest: Path, write: Callable[[Path], None], before_replace: Callable[[], None] | None = None
) -> None:
    """Write ``dest`` via a temp file in its folder: ``write(tmp)``, fsync, ``before_replace()``, replace.

    The temp file is removed in every case, so a failure leaves the old ``dest`` as it was.
    """
    dest = Path(dest)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (POSIX; a no-op elsewhere)."""
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(dest: Path, text: str) -> None:
    atomic_write(Path(dest), lambda tmp: tmp.write_text(text))


def atomic_write_json(dest: Path, data: Any) -> None:
    atomic_write_text(dest, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
