#!/usr/bin/env bash
# Installs everything sark-workers needs on a fresh Debian machine: redis-server (Debian's package)
# and a virtualenv in .venv with the project and its dev extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "bootstrap: installing redis-server from Debian's packages" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# Headless Chromium takes the Flower screenshot in the test suite (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && [ "${SARK_SKIP_CHROMIUM:-0}" != "1" ]; then
  echo "bootstrap: installing chromium from Debian's packages (Flower screenshot test)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.sark-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing the project into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import celery, mcp, workers, tasks, config" 
  touch "$stamp"
fi

# Safe by default: user tokens are sealed in broker messages and breaker resets need the operator key.
# Both keys are generated once into .env (read by workers, clients and `sark`; mode 600, git-ignored);
# keys already there are kept.
.venv/bin/sark keygen --env-file .env
