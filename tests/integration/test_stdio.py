"""stdio transport end to end: a client ``send_task``s, a real worker runs real MCP servers as its children.

Servers: ``mcp-server-time`` and ``tests/fixtures/mcp_fixture_server.py`` (official SDK) in the modes of
``tests/servers.yaml``. Process tests start their own workers and count the servers' processes by a
tag in their command line, before and after the worker stops (SIGTERM) or is killed (SIGKILL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from celery import Celery

from devkit.stack import DevStack, Proc, wait_for
from tests.helpers import invoke, send_invoke
from workers.errors import InvocationTimeout, ProtocolError, ResultTooLarge, ServerCrashed, ToolError
from workers.models import Chunk
from workers.streams import reader as stream_client

pytestmark = pytest.mark.usefixtures("worker")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SERVER = FIXTURES / "mcp_fixture_server.py"


def _pid(app: Celery, server: str = "fixture") -> int:
    return int(invoke(app, server, "pid")["result"]["structuredContent"]["result"])


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _tagged(tag: str) -> set[int]:
    """Pids of the live processes whose command line holds ``tag`` (a zombie's is empty)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag.encode() in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def _progress(chunk: Chunk) -> float:
    assert isinstance(chunk.data, dict) and isinstance(chunk.data["progress"], int | float)
    return float(chunk.data["progress"])


def _gone(pids: set[int]) -> bool:
    """True when none of ``pids`` exists any more, not even as a zombie."""
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


# --- the real mcp-server-time ------------------------------------------------------------------------
def test_time_server_call_and_list_tools(celery_client: Celery, worker: Proc) -> None:
    result = invoke(celery_client, "time", "get_current_time", {"timezone": "Europe/Paris"})
    assert result["transport"] == "stdio" and result["is_error"] is False
    assert result["result"]["structuredContent"]["timezone"] == "Europe/Paris"
    converted = invoke(celery_client, "time", "convert_time",
                       {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"})
    assert converted["result"]["structuredContent"]["target"]["datetime"].startswith(
        converted["result"]["structuredContent"]["source"]["datetime"][:10])
    tools = celery_client.send_task("sark.list_tools", kwargs={"server": "time"}).get(timeout=30)
    assert {t["tool_name"] for t in tools} == {"get_current_time", "convert_time"}
    assert {t["server_name"] for t in tools} == {"time"}


def test_time_server_rejects_bad_arguments_as_tool_error(celery_client: Celery) -> None:
    with pytest.raises(ToolError) as caught:
        invoke(celery_client, "time", "no_such_tool", {})
    assert caught.value.status_code == 400


# --- the fixture server: warm session, results, streams ----------------------------------------------
def test_warm_session_is_shared_by_concurrent_calls(celery_client: Celery, worker: Proc) -> None:
    first = _pid(celery_client)
    assert _ppid(first) == worker.pid  # a child of the worker itself
    with ThreadPoolExecutor(16) as pool:
        pids = list(pool.map(lambda _: _pid(celery_client), range(32)))
    assert set(pids) == {first}


def test_list_tools_follows_pagination(celery_client: Celery) -> None:
    tools = celery_client.send_task("sark.list_tools", kwargs={"server": "fixture"}).get(timeout=30)
    names = {t["tool_name"] for t in tools}
    assert len(tools) == len(names) == 31  # 19 tools + 12 padding ones, served 5 per page
    assert {"echo", "progress", "tool_11"} <= names
    echo = next(t for t in tools if t["tool_name"] == "echo")
    assert echo["parameters"][0]["name"] == "text" and echo["parameters"][0]["required"] is True


def test_structured_content_and_is_error(celery_client: Celery) -> None:
    structured = invoke(celery_client, "fixture", "structured", {"city": "Paris"})
    assert structured["result"]["structuredContent"] == {"city": "Paris", "celsius": 21.5}
    failed = invoke(celery_client, "fixture", "fail", {"reason": "no luck"})
    assert failed["is_error"] is True
    assert "no luck" in failed["result"]["content"][0]["text"]


def test_progress_notifications_become_stream_chunks(celery_client: Celery) -> None:
    pending = send_invoke(celery_client, "fixture", "progress", {"steps": 5, "delay": 0.02}, stream=True)
    chunks = list(stream_client.stream(pending.id, idle_timeout=20))
    result = pending.get(timeout=30)
    assert [c.event_type for c in chunks] == ["progress"] * 5
    assert [_progress(c) for c in chunks] == [1, 2, 3, 4, 5]
    assert chunks[-1].data == {"progress": 5.0, "total": 5.0, "message": "step 5"}
    assert result["chunks"] == 5 and result["result"]["structuredContent"]["result"] == "done 5"


def test_progress_flood_is_coalesced_in_order_and_the_call_succeeds(celery_client: Celery) -> None:
    # 20 000 notifications as fast as the server writes them: far faster than chunks reach Redis. The
    # worker keeps at most a few hundred waiting (tests/unit/test_stdio_progress.py proves the bound);
    # what reaches the stream is in order, contiguous, and ends with the last state.
    pending = send_invoke(celery_client, "fixture", "progress_flood", {"count": 20_000}, stream=True, timeout=60)
    chunks = list(stream_client.stream(pending.id, idle_timeout=30))
    result = pending.get(timeout=60)
    assert result["result"]["structuredContent"]["result"] == "flooded 20000"
    assert result["chunks"] == len(chunks) <= 20_000
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    progress = [_progress(c) for c in chunks]
    assert progress == sorted(set(progress)) and progress[-1] == 20_000


def test_environment_is_explicit(celery_client: Celery) -> None:
    keys = set(invoke(celery_client, "fixture", "env_keys")["result"]["structuredContent"]["result"])
    assert {"FIXTURE_VISIBLE", "PATH"} <= keys
    assert keys <= {"FIXTURE_VISIBLE", "PATH", "LC_CTYPE"}  # LC_CTYPE: Python's own C-locale coercion
    assert not any(k.startswith("SARK_") for k in keys)


def test_stderr_flood_does_not_stall_the_server(celery_client: Celery) -> None:
    result = invoke(celery_client, "fixture", "stderr_flood", {"size": 1_048_576}, timeout=20)
    assert result["result"]["structuredContent"]["result"] == "wrote 1048576"


# --- failures ----------------------------------------------------------------------------------------
def test_timeout_sends_cancellation_and_keeps_the_session(celery_client: Celery, worker: Proc) -> None:
    before = _pid(celery_client)
    started = time.monotonic()
    with pytest.raises(InvocationTimeout):
        invoke(celery_client, "fixture", "sleep", {"seconds": 30}, timeout=1)
    assert time.monotonic() - started < 10
    # The server saw notifications/cancelled (its handler was interrupted) and said so on stderr → worker log.
    wait_for(lambda: "sleep cancelled after request for 30.0s" in worker.log(), 10, "cancellation in the log")
    assert _pid(celery_client) == before


def test_crash_fails_in_flight_calls_at_once_then_restarts(celery_client: Celery) -> None:
    before = _pid(celery_client)
    sleeping = send_invoke(celery_client, "fixture", "sleep", {"seconds": 25}, timeout=30)
    time.sleep(0.3)  # let the sleep reach the server before it crashes
    started = time.monotonic()
    with pytest.raises(ServerCrashed, match="exited with status 7"):
        invoke(celery_client, "fixture", "crash", {"after": 0.2})
    with pytest.raises(ServerCrashed):
        sleeping.get(timeout=10)
    assert time.monotonic() - started < 5  # not the 25 s of the sleep, nor its 30 s timeout
    after = _pid(celery_client)  # restarted on next use
    assert after != before


def test_garbage_on_stdout_is_a_protocol_error(celery_client: Celery) -> None:
    before = _pid(celery_client)
    with pytest.raises(ProtocolError, match="not JSON-RPC"):
        invoke(celery_client, "fixture", "garbage")
    assert _pid(celery_client) != before  # the corrupted session was replaced


def test_huge_result_is_result_too_large_and_session_survives(celery_client: Celery) -> None:
    before = _pid(celery_client)
    with pytest.raises(ResultTooLarge) as caught:
        invoke(celery_client, "fixture", "big", {"size": 3_000_000})
    assert caught.value.detail["size"] > caught.value.detail["limit"]
    assert _pid(celery_client) == before  # only that answer was dropped
    assert len(invoke(celery_client, "fixture", "big", {"size": 100_000})["result"]["content"][0]["text"]) == 100_000


@pytest.mark.parametrize(
    ("server", "error", "text"),
    [
        ("fixture-exits", ServerCrashed, "exited with status 3: fixture: exiting at once on purpose"),
        ("fixture-hang-init", ServerCrashed, "did not complete the MCP handshake within 1.5s"),
        ("fixture-garbage", ProtocolError, "Welcome to a server that prints banners"),
    ],
)
def test_broken_servers_give_typed_errors_and_others_keep_working(
    celery_client: Celery, worker: Proc, server: str, error: type[Exception], text: str
) -> None:
    started = time.monotonic()
    with pytest.raises(error, match=text):
        invoke(celery_client, server, "echo", {"text": "x"}, timeout=20)
    assert time.monotonic() - started < 8
    assert invoke(celery_client, "time", "get_current_time", {"timezone": "UTC"})["is_error"] is False
    assert invoke(celery_client, "fixture", "echo", {"text": "still here"})["result"]["content"][0]["text"] == (
        "still here")


def test_max_calls_and_idle_recycle(celery_client: Celery) -> None:
    pids = [_pid(celery_client, "fixture-recycled") for _ in range(4)]
    assert pids[0] == pids[1] == pids[2] != pids[3]  # max_calls: 3
    wait_for(lambda: not Path(f"/proc/{pids[0]}").exists(), 10, "the recycled process to be gone")
    wait_for(lambda: not Path(f"/proc/{pids[3]}").exists(), 10, "the idle process to be stopped")  # idle 1.5 s


# --- process lifetime: SIGTERM and SIGKILL of the worker ----------------------------------------------
def _registry(tmp_path: Path, tag: str) -> Path:
    path = tmp_path / "servers.yaml"
    fixture = '"{python}"'
    path.write_text(
        "servers:\n"
        f"  time:\n    transport: stdio\n    command: \"{{bin}}/mcp-server-time\"\n"
        f"    args: [\"--local-timezone\", \"UTC\"]\n    eager: true\n"
        f"  fixture:\n    transport: stdio\n    command: {fixture}\n    args: [\"{SERVER}\", \"--tag\", \"{tag}\"]\n"
        "    eager: true\n"
        f"  stubborn:\n    transport: stdio\n    command: {fixture}\n"
        f"    args: [\"{SERVER}\", \"--stubborn\", \"--tag\", \"{tag}\"]\n    eager: true\n    stop_grace: 0.5\n"
    )
    return path


def _wait_tagged(tag: str, count: int) -> set[int]:
    wait_for(lambda: len(_tagged(tag)) == count, 20, f"{count} tagged server processes")
    return _tagged(tag)


def _time_servers_of(parent: int) -> list[int]:
    return [pid for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
            if _ppid(pid) == parent and b"mcp-server-time" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_worker_stop_leaves_no_child_processes(stack: DevStack, tmp_path: Path) -> None:
    tag = f"sark-test-{uuid.uuid4().hex[:8]}"
    proc = stack.worker("stdio-stop", env={"SARK_REGISTRY_PATH": str(_registry(tmp_path, tag))},
                        queues="sark.stdio", concurrency=2)
    try:
        servers = _wait_tagged(tag, 2)
        assert all(_ppid(pid) == proc.pid for pid in servers)
        wait_for(lambda: len(_time_servers_of(proc.pid)) == 1, 20, "the eager time server")
        time_pid = _time_servers_of(proc.pid)[0]
        proc.send_signal(signal.SIGTERM)
        proc.popen.wait(30)  # the worker exits by itself: no killpg by the test harness
        assert proc.popen.returncode == 0
        assert _gone(servers | {time_pid})  # neither running nor zombie
        assert "stubborn" in proc.log() and "sending SIGKILL" in proc.log()  # it ignored stdin EOF and SIGTERM
    finally:
        proc.stop()
        stack.procs.remove(proc)


def test_worker_sigkill_leaves_no_orphans(stack: DevStack, tmp_path: Path) -> None:
    tag = f"sark-test-{uuid.uuid4().hex[:8]}"
    env = {**stack.base_env(), "SARK_REGISTRY_PATH": str(_registry(tmp_path, tag))}
    log_path = tmp_path / "worker.log"
    argv = [sys.executable, str(FIXTURES / "subreaper.py"), sys.executable, "-m", "celery", "-A", "workers.app",
            "worker", "-Q", "sark.stdio", "-P", "threads", "-c", "2", "-n", "stdio-kill@%h", "-l", "INFO",
            "--without-gossip", "--without-mingle"]
    with log_path.open("ab") as log:
        reaper = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: " ready." in log_path.read_text(errors="replace"), 60, "worker under the subreaper")
        worker_pid = int(log_path.read_text().split("subreaper child ", 1)[1].split()[0])
        servers = _wait_tagged(tag, 2)
        assert all(_ppid(pid) == worker_pid for pid in servers)
        wait_for(lambda: len(_time_servers_of(worker_pid)) == 1, 20, "the eager time server")
        time_pid = _time_servers_of(worker_pid)[0]
        os.kill(worker_pid, signal.SIGKILL)
        # PR_SET_PDEATHSIG kills every server at once, the stubborn one too; the subreaper reaps them.
        wait_for(lambda: _gone(servers | {time_pid}), 10, "the servers of the killed worker to be gone")
        assert reaper.wait(10) != 0  # exits once every orphan is reaped (the worker died of SIGKILL)
    finally:
        if reaper.poll() is None:
            os.killpg(reaper.pid, signal.SIGKILL)
            reaper.wait(5)
