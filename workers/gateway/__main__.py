"""Run the reference Gateway: ``python -m workers.gateway --port 8080``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from workers.gateway.app import DEFAULT_GATEWAY_CONFIG, create_gateway, load_gateway_config


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m workers.gateway", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--config", type=Path, default=DEFAULT_GATEWAY_CONFIG)
    parser.add_argument("--prefix", default=os.environ.get("SARK_GATEWAY_PATH_PREFIX", ""))
    args = parser.parse_args(argv)
    config = load_gateway_config(
        args.config,
        api_key=os.environ.get("SARK_GATEWAY_API_KEY"),
        jwt_secret=os.environ.get("SARK_GATEWAY_JWT_SECRET"),
    )
    app = create_gateway(config)
    if args.prefix.strip("/"):
        app = Starlette(routes=[Mount("/" + args.prefix.strip("/"), app=app)])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
