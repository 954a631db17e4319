"""Transports: how a worker reaches its targets (see :mod:`workers.transports.base`)."""

from workers.transports.base import Call, ChunkSink, ToolOutcome, Transport

__all__ = ["Call", "ChunkSink", "ToolOutcome", "Transport"]
