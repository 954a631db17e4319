#!/usr/bin/env bash
# The official MCP conformance suite (@modelcontextprotocol/conformance, client mode) against the
# streamable-http transport THROUGH THE QUEUE: for each scenario the suite starts a test server and runs
# devkit/conformance_client.py, which lists and calls its tools via Redis and a real Celery worker.
# Scenarios run one at a time (the suite's --suite starts them all at once); checks.json per scenario in
# test-artifacts/conformance/. Needs Node >= 20 and npm. Exit 1 if any scenario failed.
# CONFORMANCE_PYTHON=<python> uses that interpreter (with this checkout on PYTHONPATH) instead of
# bootstrapping .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
started=$SECONDS

version=0.1.13
prefix=.cache/conformance
scenarios=(initialize tools_call sse-retry auth/client-credentials-basic auth/client-credentials-jwt)
results=test-artifacts/conformance

if [ -z "${CONFORMANCE_PYTHON:-}" ]; then
  bash scripts/bootstrap.sh
fi
python="${CONFORMANCE_PYTHON:-$root/.venv/bin/python}"

command -v node >/dev/null 2>&1 || { echo "conformance: node (>= 20) and npm are needed" >&2; exit 1; }
manifest="$prefix/node_modules/@modelcontextprotocol/conformance/package.json"
installed="$( [ -f "$manifest" ] && node -p "require('./$manifest').version" 2>/dev/null || true)"
if [ "$installed" != "$version" ]; then
  echo "conformance: installing @modelcontextprotocol/conformance@$version into $prefix" >&2
  npm install --prefix "$prefix" "@modelcontextprotocol/conformance@$version" --no-audit --no-fund --silent
fi
suite="$prefix/node_modules/.bin/conformance"

rm -rf "$results"
mkdir -p "$results"
# The suite appends the test server's url to this command and runs it through a shell.
client="env PYTHONPATH=$root $python -m devkit.conformance_client"

run_scenario() {  # $1: scenario; output to the terminal and to $results/<scenario>.log
  local log="$results/${1//\//_}.log"
  echo "== conformance scenario $1" >&2
  "$suite" client --command "$client" --scenario "$1" --timeout 120000 -o "$results" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

declare -A outcome
failed=0
for scenario in "${scenarios[@]}"; do
  if run_scenario "$scenario"; then
    outcome[$scenario]=PASSED
  elif [ "$scenario" = sse-retry ]; then
    # Timing sensitive (reconnect within the server's retry window): one more try on a busy machine.
    echo "conformance: sse-retry failed; retrying it once (timing sensitive)" >&2
    if run_scenario "$scenario"; then
      outcome[$scenario]="PASSED (on retry)"
    else
      outcome[$scenario]="FAILED (twice)"; failed=$((failed + 1))
    fi
  else
    outcome[$scenario]=FAILED; failed=$((failed + 1))
  fi
done

echo
echo "MCP conformance $version, client mode, streamable-http through the queue ($((SECONDS - started))s):"
printf '  %-32s %s\n' scenario result
for scenario in "${scenarios[@]}"; do
  printf '  %-32s %s\n' "$scenario" "${outcome[$scenario]}"
done
echo "  checks: $results/"
if [ "$failed" -ne 0 ]; then
  echo "conformance: $failed scenario(s) failed" >&2
  exit 1
fi
