"""Run the reference Gateway: ``python -m devkit.gateway --port 8080``.

Secrets come from the environment (``SARK_GATEWAY_API_KEY``, ``SARK_GATEWAY_JWT_SECRET``), a file
(``--jwt-secret-file``) or the config file, never from a flag's value: argv is readable by every
local user (``ps``). The ``--enable-control`` and ``--record-headers`` switches are for tests only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m devkit.gateway`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m devkit.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Gateway's options (``python -m devkit.gateway`` and ``sark gateway`` alike)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--config", type=Path, help="the Gateway's YAML config (default: config/gateway.yaml)")
    parser.add_argument("--prefix", default=os.environ.get("SARK_GATEWAY_PATH_PREFIX", ""))
    parser.add_argument("--jwt-secret-file", type=Path, help="file holding the HS256 secret of user JWTs")
    # store_true with default None: an absent flag leaves the config file's value alone
    parser.add_argument("--insecure-no-api-key", action="store_true", default=None,
                        help="accept any caller when no API key is set (throwaway local runs only)")
    parser.add_argument("--enable-control", action="store_true", default=None,
                        help="TEST ONLY: serve /_control/* (inject failures, read counters)")
    parser.add_argument("--record-headers", action="store_true", default=None,
                        help="TEST ONLY: keep the last 50 request headers, API key and tokens included, "
                             "for /_control/stats (needs --enable-control)")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve until interrupted; exit 2 when the configuration is unsafe or invalid."""
    parser = build_parser()
    serve(parser, parser.parse_args(argv))


def serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Serve with parsed :func:`add_arguments` options until interrupted (``parser`` reports bad ones)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from devkit.gateway.app import DEFAULT_GATEWAY_CONFIG, GatewayConfigError, create_gateway, load_gateway_config

    secret = os.environ.get("SARK_GATEWAY_JWT_SECRET") or None
    if args.jwt_secret_file is not None:
        try:
            secret = args.jwt_secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            parser.exit(2, f"reference gateway: cannot read --jwt-secret-file: {exc.strerror}\n")
    try:
        config = load_gateway_config(
            args.config or DEFAULT_GATEWAY_CONFIG,
            api_key=os.environ.get("SARK_GATEWAY_API_KEY") or None,
            jwt_secret=secret,
            insecure_no_api_key=args.insecure_no_api_key,
            control_api=args.enable_control,
            record_headers=args.record_headers,
        )
    except GatewayConfigError as exc:
        parser.exit(2, f"reference gateway: refusing to start: {exc}\n")
    for name in ("insecure_no_api_key", "control_api", "record_headers"):
        if getattr(config, name):
            print(f"reference gateway: WARNING {name} is on (never in production)", file=sys.stderr, flush=True)
    app = create_gateway(config)
    if args.prefix.strip("/"):
        app = Starlette(routes=[Mount("/" + args.prefix.strip("/"), app=app)])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
