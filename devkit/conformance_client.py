"""The client the official MCP conformance suite drives (client mode): every request goes through the queue.

``npx conformance client --command "python -m devkit.conformance_client" --scenario <name>`` appends its test
server's url; this writes a one-entry registry (``target``, ``transport: streamable-http``), starts Redis and a
real worker on ``sark.streamable-http``, then runs ``sark.list_tools`` and the scenario's ``sark.invoke`` with
:class:`~workers.client.SarkClient`. Exit 0 on success, 1 with the typed error. Run by ``scripts/conformance.sh``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from devkit.stack import DevStack, Proc

__all__ = ["SCENARIOS", "main", "registry_entry"]

QUEUE = "sark.streamable-http"
SECRET_ENV = "CONFORMANCE_CLIENT_SECRET"
KEY_ENV = "CONFORMANCE_PRIVATE_KEY"

#: Scenario -> the tool it calls (``initialize``: none; the listing's session sends ``initialize``).
SCENARIOS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "initialize": None,
    "tools_call": ("add_numbers", {"a": 5, "b": 3}),
    "sse-retry": ("test_reconnection", {}),
    "auth/client-credentials-basic": ("test-tool", {}),
    "auth/client-credentials-jwt": ("test-tool", {}),
}


def _say(message: str) -> None:
    print(f"conformance-client: {message}", file=sys.stderr, flush=True)


def registry_entry(url: str, scenario: str, context: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The registry entry ``target`` for ``scenario`` and the worker environment its secret is read from.

    Raises:
        KeyError: the context lacks a field the scenario needs.
    """
    entry: dict[str, Any] = {"transport": "streamable-http", "url": url}
    env: dict[str, str] = {}
    if scenario == "auth/client-credentials-basic":
        entry["auth"] = "oauth-client-credentials"
        entry["oauth"] = {"client_id": context["client_id"], "method": "client_secret_basic",
                          "client_secret_env": SECRET_ENV}
        env[SECRET_ENV] = context["client_secret"]
    elif scenario == "auth/client-credentials-jwt":
        entry["auth"] = "oauth-client-credentials"
        entry["oauth"] = {"client_id": context["client_id"], "method": "private_key_jwt",
                          "private_key_env": KEY_ENV, "signing_algorithm": context.get("signing_algorithm", "ES256")}
        env[KEY_ENV] = context["private_key_pem"]
    return entry, env


def _tail(proc: Proc | None, lines: int = 30) -> None:
    if proc is not None:
        _say(f"last lines of the worker's log:\n{''.join(proc.log().splitlines(True)[-lines:])}")


def run(url: str, scenario: str, context: dict[str, Any], workdir: Path) -> int:
    """List and call through a real worker; 0 when the scenario's requests succeeded."""
    from config.settings import Settings
    from workers.client import SarkClient
    from workers.errors import SarkError

    call = SCENARIOS[scenario]
    entry, worker_env = registry_entry(url, scenario, context)
    registry = workdir / "servers.yaml"
    registry.write_text(json.dumps({"servers": {"target": entry}}), encoding="utf-8")  # JSON is YAML
    worker: Proc | None = None
    with DevStack(workdir, extra_env={"SARK_REGISTRY_PATH": str(registry)}) as stack:
        try:
            stack.start(gateway=False)
            stack.apply_env()
            worker = stack.worker("conformance", queues=QUEUE, concurrency=2, env=worker_env)
            _say(f"redis and a worker on {QUEUE} ready; registry entry target -> {url}")
            client = SarkClient(Settings())
            try:
                tools = client.list_tools("target", timeout=60)
                _say(f"sark.list_tools('target') -> {[t.tool_name for t in tools]}")
                if call is not None:
                    tool, arguments = call
                    result = client.invoke("target", tool, arguments).result(timeout=90)
                    _say(f"sark.invoke('target', {tool!r}, {arguments}) -> is_error={result.is_error} "
                         f"result={json.dumps(result.result)[:300]}")
                    if result.is_error:
                        _tail(worker)
                        return 1
            finally:
                client.close()
        except SarkError as exc:
            _say(f"typed error: {json.dumps(exc.to_dict())}")
            _tail(worker)
            return 1
        except Exception as exc:  # the stack did not start, or an untyped failure: say which
            _say(f"failed: {type(exc).__name__}: {exc}")
            _tail(worker)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m devkit.conformance_client [...] <server-url>`` (the suite appends the url)."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        _say("usage: python -m devkit.conformance_client <server-url>")
        return 2
    url, scenario = args[-1], os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    context: dict[str, Any] = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    if scenario not in SCENARIOS:
        _say(f"scenario {scenario!r} is not one a worker fleet runs (known: {', '.join(SCENARIOS)})")
        return 1
    _say(f"scenario {scenario} against {url} (context: {sorted(context)})")
    with tempfile.TemporaryDirectory(prefix="sark-conformance-") as tmp:
        try:
            return run(url, scenario, context, Path(tmp))
        except KeyError as exc:
            _say(f"the scenario's context lacks {exc}")
            return 1


if __name__ == "__main__":
    sys.exit(main())
