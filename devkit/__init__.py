"""The development kit: a reference Gateway, a local stack of real processes and the demo.

Not production code: tests, benchmarks, ``scripts/demo.sh`` and ``sark gateway``/``sark demo`` use it to
stand up Redis, the reference Gateway, MCP servers and workers on loopback. The worker never imports it.
"""
