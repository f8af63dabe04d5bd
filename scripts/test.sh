#!/usr/bin/env bash
# Run the tests: unit tier (tiny models), integration tier (real SmolLM2), app tier.
#   scripts/test.sh            all tiers (what CI runs)
#   scripts/test.sh unit       only the fast unit tier
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
case "$tier" in
  unit) $py -m pytest -m "not integration and not app" ;;
  integration) $py -m pytest -m integration ;;
  all)
    $py -m pytest -m "not integration and not app"
    # pytest exits 5 when a tier has no test yet; that is not a failure of the tier
    $py -m pytest -m "integration or app" || { rc=$?; [ "$rc" -eq 5 ] || exit "$rc"; }
    ;;
  *) echo "unknown tier $tier (unit, integration, all)" >&2; exit 2 ;;
esac
