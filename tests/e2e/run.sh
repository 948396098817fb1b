#!/usr/bin/env bash
# `make test-e2e`: the notebooks' widgets in JupyterLab, driven by headless Chromium (tests/e2e/README.md).
# Installs what it needs when missing -- Debian's chromium (apt) and Playwright for Python (pip, no
# browser download: Playwright drives /usr/bin/chromium) -- then runs pytest on tests/e2e with LCKD_E2E=1.
# Extra arguments go to pytest (e.g. `bash tests/e2e/run.sh -k explorer -x`).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
PLAYWRIGHT_VERSION=1.65.2   # checked with Debian 12's chromium 156
CHROMIUM=${LCKD_CHROMIUM:-/usr/bin/chromium}

if [ ! -x "$PY" ]; then
  echo "tests/e2e/run.sh: $PY not found: run \`make setup\` first (or \`make test-e2e\`, which does)" >&2
  exit 2
fi

if [ ! -x "$CHROMIUM" ]; then
  echo "tests/e2e/run.sh: $CHROMIUM is missing: installing Debian's chromium"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "tests/e2e/run.sh: not root and no sudo: install chromium (apt-get install chromium) or set LCKD_CHROMIUM" >&2
    exit 2
  fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi

if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  echo "tests/e2e/run.sh: installing playwright==$PLAYWRIGHT_VERSION into $VENV"
  "$PY" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi

export LCKD_E2E=1 LCKD_CHROMIUM="$CHROMIUM" PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
start=$(date +%s)
status=0
"$PY" -m pytest tests/e2e -q -p no:cacheprovider "$@" || status=$?
echo "tests/e2e/run.sh: $(( $(date +%s) - start )) s; screenshots and the server log in tests/e2e/artifacts/"
exit $status
