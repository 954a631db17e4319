"""stdio framing: the linear line splitter and the id of an oversized answer."""

from __future__ import annotations

import time

from workers.transports.stdio_process import LineSplitter, _oversized_id


def test_lines_split_across_chunks() -> None:
    splitter = LineSplitter(100)
    out = [*splitter.feed(b'{"a":1}\n{"b"'), *splitter.feed(b":2}\n\n")]
    assert out == [(b'{"a":1}', None), (b'{"b":2}', None), (b"", None)]


def test_oversized_line_is_skipped_with_head_tail_and_size() -> None:
    splitter = LineSplitter(50)
    body = b'{"jsonrpc":"2.0","id":7,"result":{"t":"' + b"x" * 200 + b'"}}'
    out = [*splitter.feed(body[:30]), *splitter.feed(body[30:] + b"\n"), *splitter.feed(b'{"ok":1}\n')]
    assert out[0][1] == len(body) and out[1] == (b'{"ok":1}', None)
    assert _oversized_id(out[0][0]) == 7


def test_oversized_id_at_the_end_and_notifications() -> None:
    assert _oversized_id(b'{"result":{"t":"xx\n"xx"}},"jsonrpc":"2.0","id":"r-1"}') == "r-1"
    assert _oversized_id(b'{"jsonrpc":"2.0","method":"notifications/progress","params":{\n}}') is None


def test_splitting_is_linear() -> None:
    payload = b"y" * 16_000_000 + b"\n"
    splitter = LineSplitter(32_000_000)
    started = time.perf_counter()
    lines = [line for i in range(0, len(payload), 65_536) for line in splitter.feed(payload[i:i + 65_536])]
    assert len(lines) == 1 and len(lines[0][0]) == 16_000_000
    assert time.perf_counter() - started < 2.0
