"""The stdio progress forwarder is bounded: a server flooding notifications cannot grow the worker's memory."""

from __future__ import annotations

import asyncio

from workers.models import Chunk
from workers.transports.mcp_calls import ProgressForwarder


def _progress(chunk: Chunk) -> float:
    assert isinstance(chunk.data, dict) and isinstance(chunk.data["progress"], int | float)
    return float(chunk.data["progress"])


def test_flood_against_a_stalled_sink_keeps_a_bounded_queue_and_the_newest_state() -> None:
    async def run() -> tuple[list[Chunk], int, int]:
        delivered: list[Chunk] = []
        release = asyncio.Event()

        async def sink(chunk: Chunk) -> None:
            await release.wait()  # Redis stalled: nothing leaves the queue during the flood
            delivered.append(chunk)

        forwarder = ProgressForwarder(sink, limit=100)
        for i in range(1, 50_001):
            await forwarder.on_progress(float(i), 50_000.0, f"step {i}")
        waiting = len(forwarder._pending) + (forwarder._newest is not None)
        release.set()
        await forwarder.drain()
        return delivered, waiting, forwarder.coalesced

    delivered, waiting, coalesced = asyncio.run(run())
    assert waiting <= 101  # 100 queued + the newest; before the bound: all 50 000
    assert len(delivered) <= 101 and coalesced == 50_000 - len(delivered)
    assert [c.seq for c in delivered] == list(range(len(delivered)))
    progress = [_progress(c) for c in delivered]
    assert progress == sorted(progress) and progress[-1] == 50_000  # in order, and the last state arrives


def test_message_bytes_are_bounded_too() -> None:
    async def run() -> int:
        release = asyncio.Event()

        async def sink(chunk: Chunk) -> None:
            await release.wait()

        forwarder = ProgressForwarder(sink, limit=1_000, limit_bytes=100_000)
        for i in range(500):
            await forwarder.on_progress(float(i), None, "m" * 10_000)  # 5 MB of messages offered
        waiting = sum(len(d["message"]) for d in forwarder._pending)
        release.set()
        await forwarder.drain()
        return waiting

    assert asyncio.run(run()) <= 100_000


def test_a_failing_sink_stops_delivery_and_drain_reports_it() -> None:
    async def run() -> tuple[int, BaseException | None]:
        async def sink(chunk: Chunk) -> None:
            raise RuntimeError("stream over its limit")

        forwarder = ProgressForwarder(sink, limit=10)
        for i in range(10_000):
            await forwarder.on_progress(float(i), None, None)
            if i % 100 == 0:
                await asyncio.sleep(0)
        waiting = len(forwarder._pending)
        try:
            await forwarder.drain()
        except RuntimeError as exc:
            return waiting, exc
        return waiting, None

    waiting, error = asyncio.run(run())
    assert waiting <= 10 and isinstance(error, RuntimeError)
