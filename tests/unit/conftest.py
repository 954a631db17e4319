"""Unit-test parts: a private redis-server per module, emptied before each test that asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from devkit.stack import Proc, start_redis


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A redis-server of this test module's own, on a free loopback port."""
    proc = start_redis(tmp_path_factory.mktemp("unit-redis"))
    yield proc
    proc.stop()


@pytest.fixture()
def redis_url(redis_proc: Proc) -> str:
    """URL of :func:`redis_proc`, flushed for this test."""
    client = redis.Redis.from_url(redis_proc.url)
    client.flushdb()
    client.close()
    return redis_proc.url
