"""Configuration: settings (``SARK_*`` environment) and the operator's server registry."""

from config.registry import GatewayServer, Registry, RegistryError, StdioServer, load_registry
from config.settings import Settings, get_settings

__all__ = ["GatewayServer", "Registry", "RegistryError", "Settings", "StdioServer", "get_settings", "load_registry"]
