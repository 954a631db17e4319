#!/usr/bin/env bash
# Benchmarks: every figure beside its bare-Celery / raw-Redis floor from the same run (bench/results/*.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m bench.run_all "$@"
