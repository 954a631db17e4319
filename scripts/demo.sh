#!/usr/bin/env bash
# The main job: `sark up`. Starts Redis, the reference Gateway, an MCP server over Streamable HTTP, one
# worker per transport and Flower; enqueues real invocations over HTTP, SSE, stdio and Streamable HTTP and
# prints the results and streamed chunks; then stays up (Ctrl-C stops everything). `--once`: stop after
# the demo (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m devkit.up "$@"
