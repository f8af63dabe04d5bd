#!/usr/bin/env bash
# Run the tests: unit tier (tiny models), integration tier (real SmolLM2), app tier.
#   scripts/test.sh            all tiers (what CI runs)
#   scripts/test.sh unit       only the fast unit tier (twice: default float order, then another)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
# The app tier's real-browser test drives headless Chromium (the distribution's package); install it once.
if [ "${1:-all}" = all ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
   && [ -z "${TUNELENS_CHROMIUM:-}" ]; then
  if command -v apt-get >/dev/null; then
    echo "installing Chromium for the app's browser test (apt, about 30 s, once) ..."
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  else
    echo "the app's browser test needs Chromium: install it, or set TUNELENS_CHROMIUM=/path/to/chrome" >&2
    exit 1
  fi
fi
tier=${1:-all}
py=.venv/bin/python
$py -m ruff check .
$py -m ruff format --check .
# The dependency rule and no import circles (the contracts in pyproject.toml).
.venv/bin/lint-imports --no-cache
# The unit tier includes the packages' doctests (the app's pages are Streamlit scripts, not modules).
unit_tier() {
  $py -m pytest -m "not integration and not app" tests tunelens probes circuits spectral --doctest-modules "$@"
}
# The unit tier a second time on another float summation order, so that a test that holds only for this
# CPU's order fails here and not on a user's machine: MKL's AVX2 code path where the default is AVX-512
# (as on this project's machines), its SSE code path otherwise, and one thread instead of the cores'
# count (torch's reductions and MKL's GEMMs split their sums by thread).
alt_unit_tier() {
  local path=COMPATIBLE
  grep -qw avx512f /proc/cpuinfo 2>/dev/null && path=AVX2
  echo "unit tier again: MKL_CBWR=$path, one thread"
  MKL_CBWR=$path OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 unit_tier -q
}
case "$tier" in
  unit)
    unit_tier
    alt_unit_tier
    ;;
  integration) $py -m pytest -m integration ;;
  all)
    unit_tier
    alt_unit_tier
    # pytest exits 5 when a tier has no test yet; that is not a failure of the tier
    $py -m pytest -m "integration or app" || { rc=$?; [ "$rc" -eq 5 ] || exit "$rc"; }
    # the app's pages once more, on a toy of a fused-projection family (GPT-2: Conv1D, c_attn, LayerNorm)
    echo "app tier again on a GPT-2 toy pair"
    TUNELENS_APP_FAMILY=gpt2 $py -m pytest -q -m app tests/app/test_browser.py tests/app/test_pages.py
    ;;
  *) echo "unknown tier $tier (unit, integration, all)" >&2; exit 2 ;;
esac
