"""The demo invocations: tools over all four transports, typed errors and streamed chunks.

``sark up`` (``bash scripts/demo.sh``) starts a local fleet and runs them against it; ``sark demo`` (``sark up
--once``) runs them and stops. Everything runs on loopback.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.client import SarkClient

__all__ = ["main", "run_examples"]


def _show(title: str, data: Any) -> None:
    print(f"\n=== {title}")
    print(json.dumps(data, indent=2, default=str) if not isinstance(data, str) else data)


def run_examples(client: SarkClient, user: str) -> int:
    """Enqueue the demo invocations over every transport and print what comes back; returns how many steps
    did not give the expected outcome."""
    from workers.errors import AuthorizationDenied, SarkError, UnknownServer

    failures = 0
    try:
        _show("Gateway servers (sark.list_servers)", [s.server_id for s in client.list_servers()])

        handle = client.invoke("echo", "add", {"a": 40, "b": 2}, token=user)
        result = handle.result(timeout=30)
        _show(f"HTTP  echo.add(40, 2)  task {handle.id}", result.model_dump(mode="json"))

        try:
            client.invoke("restricted", "echo", {}, token=user).result(timeout=30)
            failures += 1
        except AuthorizationDenied as exc:
            _show("HTTP  restricted.echo as alice -> typed error", exc.to_dict())

        try:
            client.invoke("no-such-server", "echo", {}, token=user).result(timeout=30)
            failures += 1
        except UnknownServer as exc:
            _show("unknown server -> typed error, no network call", exc.to_dict())

        handle = client.invoke("echo-stream", "stream_data", {"count": 5, "interval": 0.05}, token=user,
                               stream=True)
        print(f"\n=== SSE   echo-stream.stream_data(count=5)  task {handle.id}: chunks as they arrive")
        for chunk in handle.stream():
            print(f"  chunk seq={chunk.seq} id={chunk.event_id} data={json.dumps(chunk.data)}")
        _show("SSE   final result", handle.result(timeout=30).model_dump(mode="json"))

        tools = client.list_tools("time")
        _show("stdio mcp-server-time tools (sark.list_tools)", [t.tool_name for t in tools])
        started = time.perf_counter()
        handle = client.invoke("time", "get_current_time", {"timezone": "Europe/Paris"})
        result = handle.result(timeout=60)
        _show(f"stdio time.get_current_time(Europe/Paris)  {1000 * (time.perf_counter() - started):.1f} ms",
              result.model_dump(mode="json"))
        started = time.perf_counter()
        result = client.invoke("time", "convert_time", {"source_timezone": "Europe/Paris", "time": "16:30",
                                                         "target_timezone": "Asia/Tokyo"}).result(timeout=60)
        _show(f"stdio time.convert_time (warm session)  {1000 * (time.perf_counter() - started):.1f} ms",
              result.result.get("structuredContent") or result.result)

        tools = client.list_tools("example-http")
        _show("streamable-http example-http tools (sark.list_tools)", [t.tool_name for t in tools])
        handle = client.invoke("example-http", "progress", {"count": 3}, stream=True)
        print(f"\n=== streamable-http example-http.progress(count=3)  task {handle.id}: progress as chunks")
        for chunk in handle.stream():
            print(f"  chunk seq={chunk.seq} id={chunk.event_id} data={json.dumps(chunk.data)}")
        _show("streamable-http final result", handle.result(timeout=60).model_dump(mode="json"))
        started = time.perf_counter()
        result = client.invoke("example-http", "add", {"a": 40, "b": 2}).result(timeout=60)
        _show(f"streamable-http example-http.add(40, 2) (warm session)  "
              f"{1000 * (time.perf_counter() - started):.1f} ms", result.result)
    except SarkError as exc:
        failures += 1
        _show("UNEXPECTED ERROR", exc.to_dict())
    return failures


def main() -> int:
    """Run the demo on a fleet started for it, then stop it (``sark up --once``); 0 when every step gave the
    expected outcome."""
    from devkit.up import main as up_main

    return up_main(["--once"])


if __name__ == "__main__":
    sys.exit(main())
