"""sark-workers: Celery workers carrying out MCP tool invocations over HTTP, SSE and stdio."""

__version__ = "0.1.0"
