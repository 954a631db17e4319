#!/usr/bin/env bash
# The main job: starts Redis, the reference Gateway and a worker, then enqueues real invocations
# over HTTP, SSE and stdio and prints the results and streamed chunks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m devkit.demo "$@"
