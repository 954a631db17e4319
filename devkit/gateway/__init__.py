"""The reference Gateway (an ASGI app implementing the Gateway REST contract)."""

from devkit.gateway.app import GatewayConfig, GatewayConfigError, create_gateway, load_gateway_config, make_token

__all__ = ["GatewayConfig", "GatewayConfigError", "create_gateway", "load_gateway_config", "make_token"]
