"""One stdio MCP server process, as an ``mcp`` client transport (newline-delimited JSON-RPC).

:class:`StdioPipe` is what ``mcp.Client`` gets instead of the SDK's ``stdio_client``; the SDK still
does all of JSON-RPC (handshake, requests, progress, cancellation). Only the pipes are ours, for
reasons measured or required by the worker:

* the SDK's reader re-joins its line buffer on every 64 KiB chunk: a 16 MB result took 8-11 s
  (quadratic); :class:`LineSplitter` is linear and caps a line at ``max_line_bytes``; an oversized
  answer fails only its own request (an error response is injected for its id);
* the child is started through :mod:`workers.transports.stdio_launch` (resource limits, optional
  uid/gid, parent-death signal), in its own process group, with exactly the configured environment;
* stderr is drained line by line into the worker log (no 64 KiB pipe stall), last lines kept for errors;
* exit, garbage on stdout and oversized unattributable output end the connection at once with a typed
  :attr:`StdioPipe.failure`, so pending calls fail now instead of at their timeout;
* shutdown is close stdin → SIGTERM to the group → SIGKILL, each after ``stop_grace``, then reaped.

Upstream issue (mcp python-sdk)
-------------------------------
Text to file at modelcontextprotocol/python-sdk; once a release reads stdout linearly (and can cap a
line), :class:`StdioPipe` can shrink to what the SDK's ``stdio_client`` lacks (launcher, caps)::

    stdio_client: reading one long line from the server is quadratic in its length

    mcp 2.3.0, mcp/client/stdio.py, stdout_reader():

        buffer = ""
        async for chunk in stdout:                   # TextReceiveStream, <= 64 KiB per chunk
            lines = (buffer + chunk).split("\n")
            buffer = lines.pop()

    For a line of n bytes every chunk copies and re-scans the whole partial line: about n/65536
    copies of up to n characters, O(n^2 / 65536). A tool result of a few MB (a file, an image in
    base64, a big table) is one JSON-RPC line.

    Reproduction (one process, no MCP server needed): a child writes one line of n bytes; read it
    with anyio.open_process + TextReceiveStream + the loop above, vs asyncio's stdout.read(65536)
    with a splitter that only scans each new chunk. Measured (Python 3.11, 2 cores):
        10 MB line over a pipe: SDK loop 385-760 ms, chunk-scanning splitter 52-56 ms
        20 MB line over a pipe: SDK loop 1350-2840 ms, chunk-scanning splitter 88-119 ms
        CPU only, 10 MB in 153 chunks: 280 ms vs 12 ms; 20 MB in 306 chunks: 1160 ms vs 24 ms
    (twice the line, four times the time). End to end through a real server, a 16 MB result took
    8-11 s. There is also no upper bound on a line: a server can grow the buffer until the
    client runs out of memory.

    Proposed fix: search only the new chunk for "\n"; keep the pending pieces of an unfinished
    line in a list (or bytearray) and join them once, when its newline arrives; read bytes and
    decode one complete line at a time (UTF-8 cannot contain b"\n" inside a character, so the
    incremental decoder is not needed). Optionally StdioServerParameters.max_line_bytes: past it,
    skip to the next newline and answer the request it belonged to with an error, rather than
    buffering without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.shared.message import SessionMessage

from config.registry import StdioLimits, StdioServer, UnsetVariable
from workers.errors import ProtocolError, ResultTooLarge, SarkError, ServerCrashed

if TYPE_CHECKING:
    from mcp.client._transport import TransportStreams  # the SDK exports no public name for the pair

__all__ = ["OUTPUT_TOO_LARGE", "LineSplitter", "StdioPipe", "child_environment", "launch_argv"]

log = logging.getLogger("sark.stdio")

#: JSON-RPC error code injected for a response longer than ``max_line_bytes`` (implementation-defined range).
OUTPUT_TOO_LARGE = -32097

_LAUNCHER = str(Path(__file__).with_name("stdio_launch.py"))
_READ_CHUNK = 65_536
_STDERR_LINE_MAX = 4_096
_STDERR_TAIL = 20
_POLL = 0.01
_ID_HEAD = re.compile(
    rb'^\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*(-?\d{1,20}|"[^"\\]{0,200}")\s*,\s*"(?:result|error)"'
)
_ID_TAIL = re.compile(rb'"id"\s*:\s*(-?\d{1,20}|"[^"\\]{0,200}")\s*\}\s*$')


def launch_argv(server: StdioServer, identity: tuple[int, int, list[int]] | None = None) -> list[str]:
    """The argv that starts ``server`` through the launcher: its limits, ``identity`` (uid, gid, groups)."""
    options = [f"--rlimit={name}:{soft}:{hard}" for name, soft, hard in _rlimits(server.limits)]
    if identity is not None:
        uid, gid, groups = identity
        options += [f"--uid={uid}", f"--gid={gid}", f"--groups={','.join(map(str, groups))}"]
    return [sys.executable, "-I", "-S", _LAUNCHER, str(os.getpid()), *options, "--", server.command, *server.args]


def _rlimits(limits: StdioLimits) -> list[tuple[str, int, int]]:
    found = []
    if limits.address_space_mb is not None:
        found.append(("AS", limits.address_space_mb << 20, limits.address_space_mb << 20))
    if limits.open_files is not None:
        found.append(("NOFILE", limits.open_files, limits.open_files))
    if limits.cpu_seconds is not None:  # SIGXCPU at the soft limit, SIGKILL one second later
        found.append(("CPU", limits.cpu_seconds, limits.cpu_seconds + 1))
    if limits.processes is not None:
        found.append(("NPROC", limits.processes, limits.processes))
    return found


def child_environment(server: StdioServer, environ: Mapping[str, str]) -> dict[str, str]:
    """Exactly ``inherit_env`` (when set in ``environ``) plus ``env`` with ``${NAME}`` taken from ``environ``.

    Raises:
        ServerCrashed: a ``${NAME}`` is not set (the message names it, never a value).
    """
    try:
        return server.child_env(environ)
    except UnsetVariable as exc:
        raise ServerCrashed(f"stdio server {server.name!r} could not be started: ${{{exc.name}}} of its env is "
                            "not set in the worker's environment", {"server": server.name,
                                                                     "variable": exc.name}) from None


def _launch_identity(server: StdioServer) -> tuple[int, int, list[int]] | None:
    try:
        return server.identity()
    except LookupError as exc:
        raise ServerCrashed(f"stdio server {server.name!r} could not be started: {exc}",
                            {"server": server.name}) from None


def _exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    why = {"SIGXCPU": " (CPU time limit: limits.cpu_seconds)", "SIGXFSZ": " (file size limit)"}.get(name, "")
    return f"was killed by {name}{why}"


class LineSplitter:
    """Splits a byte stream into lines, linear in its size, never holding more than ``limit`` bytes.

    :meth:`feed` yields ``(line, None)`` for each complete line, and ``(head + tail, size)`` once for
    a line longer than ``limit`` (only its first and last bytes are kept; the rest is skipped).
    """

    _KEEP = 1_024

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False
        self._head = b""
        self._tail = b""
        self._skipped = 0

    def feed(self, chunk: bytes) -> Iterator[tuple[bytes, int | None]]:
        """Lines completed by ``chunk``."""
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if self._skipping:
                self._skipped += len(piece)
                self._tail = (self._tail + piece)[-self._KEEP:]
            elif len(self._buf) + len(piece) > self.limit:
                self._skipping = True
                self._skipped = len(self._buf) + len(piece)
                self._head = bytes((self._buf + piece[: self._KEEP])[: self._KEEP])
                self._tail = bytes((self._buf[-self._KEEP:] + piece)[-self._KEEP:])
                self._buf.clear()
            else:
                self._buf += piece
            if end < 0:
                return
            start = end + 1
            if self._skipping:
                self._skipping = False
                yield self._head + b"\n" + self._tail, self._skipped
            else:
                line = bytes(self._buf)
                self._buf.clear()
                yield line, None


def _oversized_id(sample: bytes) -> types.RequestId | None:
    """The id of an oversized response, from its first or last bytes (None: not a response)."""
    head, _, tail = sample.partition(b"\n")
    match = _ID_HEAD.match(head) or (_ID_TAIL.search(tail) if b'"method"' not in head[:200] else None)
    if match is None:
        return None
    value = json.loads(match.group(1))
    return value if isinstance(value, int | str) else None


class StdioPipe:
    """An ``mcp`` client transport over one server process's stdin/stdout (async context manager).

    Args:
        server: The registry entry (command, args, env, cwd, limits, user, ``stop_grace``).
        max_line_bytes: Longest accepted stdout line; a longer response fails its request.
        environ: Where ``inherit_env`` and ``${NAME}`` are read (the worker's environment at start,
            without its secrets: :func:`workers.environment.launch_environment`).
    """

    def __init__(self, server: StdioServer, *, max_line_bytes: int, environ: Mapping[str, str]) -> None:
        self.server = server
        self.environ = environ
        self.max_line_bytes = max_line_bytes
        #: Why the connection ended when the server ended it (None: still up, or we closed it).
        self.failure: SarkError | None = None
        #: Set when the server's stdout ended or was found unusable.
        self.dead = asyncio.Event()
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL)
        self._proc: asyncio.subprocess.Process | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        """The server's pid (and process group id) once started."""
        return self._proc.pid if self._proc else None

    async def __aenter__(self) -> TransportStreams:
        server = self.server
        env, identity = child_environment(server, self.environ), _launch_identity(server)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *launch_argv(server, identity),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=server.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServerCrashed(f"stdio server {server.name!r} could not be started: {exc.strerror or exc}",
                                {"server": server.name}) from None
        log.info("stdio server %s started (pid %d)", server.name, self._proc.pid,
                 extra={"stdio_server": server.name, "server_pid": self._proc.pid})
        read_send, read_recv = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write_send, write_recv = anyio.create_memory_object_stream[SessionMessage](0)
        self._tasks = [
            asyncio.create_task(self._read_stdout(read_send), name=f"stdio-out-{server.name}"),
            asyncio.create_task(self._write_stdin(write_recv), name=f"stdio-in-{server.name}"),
            asyncio.create_task(self._drain_stderr(), name=f"stdio-err-{server.name}"),
        ]
        return read_recv, write_send

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        stop = asyncio.ensure_future(self._stop())
        try:
            await asyncio.shield(stop)
        except asyncio.CancelledError:
            await stop  # the process must be gone before we give up on it
            raise

    # -- stdout -------------------------------------------------------------------------------
    async def _read_stdout(self, send: MemoryObjectSendStream[SessionMessage | Exception]) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        splitter = LineSplitter(self.max_line_bytes)
        try:
            async with send:
                while chunk := await self._proc.stdout.read(_READ_CHUNK):
                    for line, oversize in splitter.feed(chunk):
                        if oversize is not None:
                            if not await self._oversized(send, line, oversize):
                                return
                        elif line.strip() and not await self._deliver(send, line):
                            return
                if not self._closing:
                    await self._exited()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the session is gone
        finally:
            self.dead.set()

    async def _deliver(self, send: MemoryObjectSendStream[SessionMessage | Exception], line: bytes) -> bool:
        try:
            message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        except ValueError:
            preview = line[:120].decode("utf-8", "replace")
            self._fail(ProtocolError(
                f"stdio server {self.server.name!r} wrote a line that is not JSON-RPC to stdout: {preview!r}",
                {"server": self.server.name}))
            return False
        await send.send(SessionMessage(message))
        return True

    async def _oversized(self, send: MemoryObjectSendStream[SessionMessage | Exception], sample: bytes,
                         size: int) -> bool:
        name, limit = self.server.name, self.max_line_bytes
        request_id = _oversized_id(sample)
        log.warning("stdio server %s wrote a %d-byte message, limit is %d", name, size, limit,
                    extra={"stdio_server": name})
        if request_id is not None:
            error = types.ErrorData(code=OUTPUT_TOO_LARGE, message=f"response is {size} bytes, limit is {limit}",
                                    data={"size": size, "limit": limit})
            await send.send(SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=request_id, error=error)))
            return True
        if b'"method"' in sample[:200] and b'"id"' not in sample[:200]:
            return True  # an oversized notification is dropped
        self._fail(ResultTooLarge(f"stdio server {name!r} wrote a {size}-byte message, limit is {limit}",
                                  {"server": name, "size": size, "limit": limit, "what": "message"}))
        return False

    async def _exited(self) -> None:
        proc = self._proc
        assert proc is not None
        with contextlib.suppress(TimeoutError):
            await self._wait_exit(1.0)
        tail = list(self.stderr_tail)[-5:]
        message = f"stdio server {self.server.name!r} closed its stdout and {_exit_status(proc.returncode)}"
        if tail:
            message += ": " + " | ".join(tail)
        self.failure = ServerCrashed(message, {"server": self.server.name, "returncode": proc.returncode})
        log.warning("%s", message, extra={"stdio_server": self.server.name})

    def _fail(self, error: SarkError) -> None:
        if self.failure is None:
            self.failure = error
            log.warning("%s", error.message, extra={"stdio_server": self.server.name})
        self.dead.set()

    # -- stdin / stderr -----------------------------------------------------------------------
    async def _write_stdin(self, receive: MemoryObjectReceiveStream[SessionMessage]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        try:
            async with receive:
                async for item in receive:
                    body = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                    stdin.write(body.encode("utf-8") + b"\n")
                    await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader sees the exit and reports it

    async def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        splitter = LineSplitter(_STDERR_LINE_MAX)
        extra = {"stdio_server": self.server.name, "server_pid": self._proc.pid}
        while chunk := await self._proc.stderr.read(_READ_CHUNK):
            for raw, oversize in splitter.feed(chunk):
                text = raw.decode("utf-8", "replace").rstrip()
                if oversize is not None:
                    text = f"{text[:200]}… ({oversize} bytes)"
                self.stderr_tail.append(text[:500])
                log.info("[%s stderr] %s", self.server.name, text, extra=extra)

    # -- shutdown -----------------------------------------------------------------------------
    async def _wait_exit(self, timeout: float) -> None:
        """Poll the exit status (``Process.wait`` also waits for pipes a grandchild may hold)."""
        assert self._proc is not None
        async with asyncio.timeout(timeout):
            while self._proc.returncode is None:
                await asyncio.sleep(_POLL)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def _stop(self) -> None:
        """Close stdin, then SIGTERM, then SIGKILL the server's group, each after ``stop_grace``."""
        proc = self._proc
        if proc is None:
            return
        grace = self.server.stop_grace
        if proc.stdin is not None:
            proc.stdin.close()
        escalation: list[signal.Signals | None] = [None, signal.SIGTERM, signal.SIGKILL]
        for sig in escalation:
            if sig is not None:
                log.warning("stdio server %s (pid %d) still running; sending %s", self.server.name, proc.pid,
                            sig.name, extra={"stdio_server": self.server.name})
                self._signal_group(sig)
            try:
                await self._wait_exit(grace if sig is not signal.SIGKILL else 5.0)
                break
            except TimeoutError:
                continue
        self._signal_group(signal.SIGKILL)  # anything the server left behind in its group
        await asyncio.wait(self._tasks, timeout=0.5)  # let stderr's last lines reach the log
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()
        log.info("stdio server %s (pid %d) stopped, status %s", self.server.name, proc.pid, proc.returncode,
                 extra={"stdio_server": self.server.name})
