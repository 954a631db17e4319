#!/usr/bin/env bash
# The whole test suite on a fresh machine: bootstrap, lint, type-check, then every test.
# Tests start their own redis-server, reference Gateway, MCP servers and celery workers on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "== ruff" && .venv/bin/ruff check .
echo "== mypy (strict)" && .venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest "$@"
