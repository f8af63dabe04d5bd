"""Where tunelens keeps what it builds: one data folder, ``$TUNELENS_HOME`` or ``~/.cache/tunelens``."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """The data folder (zoo models, converted GGUF files). Read from the environment on every call."""
    env = os.environ.get("TUNELENS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunelens"


def zoo_dir() -> Path:
    return data_home() / "zoo"
