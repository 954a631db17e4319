"""The reference Gateway (an ASGI app implementing the Gateway REST contract).

Its names load on first use, so that ``sark``'s parser (which takes ``sark gateway``'s options from
:mod:`devkit.gateway.__main__`) does not import Starlette for every command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devkit.gateway.app import GatewayConfig, GatewayConfigError, create_gateway, load_gateway_config, make_token

__all__ = ["GatewayConfig", "GatewayConfigError", "create_gateway", "load_gateway_config", "make_token"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from devkit.gateway import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
