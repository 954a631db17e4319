"""The transport catalog: every way a worker reaches a target, by name, in one place.

Each transport is described once, by a :class:`TransportSpec`: its registry schema (the server model of
the entries that name it), the factory that builds it in a worker, its default queue, and how it relates
to the others (which transports reach the same servers, which one streams or lists for it). Its breaker
target is its server model's :meth:`~config.registry.ServerBase.breaker_target`. The router, the runtime,
the settings, the registry, the CLI and ``check-config`` all read this catalog; none names a transport.

**Adding a transport** is one module plus one entry. The module defines its server model (a
:class:`~config.registry.ServerBase` subclass whose ``transport`` is a ``Literal`` of the new name), the
transport itself (:class:`workers.transports.base.Transport`) with a factory function taking a
:class:`workers.transports.base.BuildContext`, and ``TRANSPORT = TransportSpec(...)``. The entry is the
module's dotted path, in one of:

* :data:`BUILTIN` below (transports shipped with sark-workers);
* the ``SARK_TRANSPORT_PLUGINS`` environment variable (comma-separated module paths; read from the
  process environment, so set it for workers, clients and the CLI alike);
* the ``sark.transports`` entry-point group of an installed distribution (the entry point names the module).

The spec's module is imported wherever the catalog is read (clients included), so it must stay light:
the factory is a ``"module:function"`` string, imported only by a worker that builds the transport.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config.registry import ServerBase

__all__ = [
    "BUILTIN",
    "PLUGINS_VARIABLE",
    "TransportSpec",
    "UnknownTransport",
    "catalog",
    "default_transport",
    "get_spec",
    "listing_transport",
    "load_object",
    "reaches",
    "reset_catalog",
]

#: Module paths of the transports shipped with sark-workers (each defines ``TRANSPORT``).
BUILTIN = ("config.builtin_transports", "config.streamable_http_spec")
#: Environment variable naming plug-in transport modules (comma-separated).
PLUGINS_VARIABLE = "SARK_TRANSPORT_PLUGINS"
#: Entry-point group of plug-in transport modules.
ENTRY_POINT_GROUP = "sark.transports"

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


class UnknownTransport(LookupError):
    """No transport of that name is in the catalog."""


@dataclass(frozen=True)
class TransportSpec:
    """One transport: what a registry entry, a queue and a worker need to know of it."""

    #: The name tasks, registry entries (``transport:``), queues and ``sark worker --transports`` use.
    name: str
    #: The registry schema of servers reached by it (``transport: <name>``; may be shared with its family).
    server_model: type[ServerBase]
    #: ``"module:function"``: ``function(context: BuildContext) -> Transport``, imported only in workers.
    factory: str
    #: Queue of its invocations unless the settings say otherwise (default ``sark.<name>``).
    default_queue: str = ""
    #: Transports of one family reach the same registry entries (``http`` and ``sse``: the Gateway).
    family: str = ""
    #: Streamed invocations of this transport's servers go over that transport (``http`` → ``sse``).
    stream_via: str | None = None
    #: ``sark.list_tools`` of this transport's servers runs over that transport (``sse`` → ``http``).
    list_via: str | None = None
    #: ``"module:function"``: ``function(server, settings) -> list[config.check.Problem]`` for check-config.
    check: str | None = None
    #: One line for ``sark transports``.
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"transport name {self.name!r}: lowercase letters, digits and '-', at most 32")
        if ":" not in self.factory:
            raise ValueError(f"transport {self.name!r}: factory must be 'module:function', got {self.factory!r}")
        if not self.default_queue:
            object.__setattr__(self, "default_queue", f"sark.{self.name}")
        if not self.family:
            object.__setattr__(self, "family", self.name)

    def build(self, context: Any) -> Any:
        """The transport, built by its factory for one worker process."""
        return load_object(self.factory)(context)


def load_object(path: str) -> Any:
    """The object ``"package.module:attribute"`` names (imported on first use)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _specs_of(module_path: str) -> list[TransportSpec]:
    try:
        module = importlib.import_module(module_path)
    except ImportError as exc:
        raise ImportError(f"transport module {module_path!r} cannot be imported: {exc}") from exc
    found = getattr(module, "TRANSPORT", None)
    specs = [s for s in (found if isinstance(found, list | tuple) else [found]) if isinstance(s, TransportSpec)]
    if not specs or (isinstance(found, list | tuple) and len(specs) != len(found)):
        raise ImportError(f"transport module {module_path!r} defines no TRANSPORT = TransportSpec(...)")
    return specs


def _plugin_modules(environ: Mapping[str, str]) -> list[str]:
    named = [m.strip() for m in environ.get(PLUGINS_VARIABLE, "").split(",") if m.strip()]
    installed = [ep.value.partition(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    return list(dict.fromkeys([*installed, *named]))


def _load(modules: Iterable[str]) -> dict[str, TransportSpec]:
    specs: dict[str, TransportSpec] = {}
    for module_path in modules:
        for spec in _specs_of(module_path):
            if spec.name in specs:
                raise ValueError(f"transport {spec.name!r} is defined twice (again in {module_path})")
            specs[spec.name] = spec
    for spec in specs.values():
        for other in (spec.stream_via, spec.list_via):
            if other is not None and other not in specs:
                raise ValueError(f"transport {spec.name!r} refers to unknown transport {other!r}")
    return specs


_lock = threading.Lock()
_catalog: dict[str, TransportSpec] | None = None


def catalog() -> Mapping[str, TransportSpec]:
    """Every transport by name: the built-in ones, then the plug-ins (loaded once per process).

    Raises:
        ImportError: a plug-in module cannot be imported or defines no ``TRANSPORT``.
        ValueError: two transports share a name, or one refers to a transport that does not exist.
    """
    global _catalog
    if _catalog is None:
        with _lock:
            if _catalog is None:
                _catalog = _load([*BUILTIN, *_plugin_modules(os.environ)])
    return _catalog


def get_spec(name: str) -> TransportSpec:
    """The transport called ``name``.

    Raises:
        UnknownTransport: the catalog has no such transport (the message lists the known ones).
    """
    try:
        return catalog()[name]
    except KeyError:
        raise UnknownTransport(f"unknown transport {name!r} (known: {', '.join(catalog())})") from None


def reset_catalog() -> None:
    """Forget the loaded catalog (tests that change ``SARK_TRANSPORT_PLUGINS``)."""
    global _catalog
    with _lock:
        _catalog = None


def default_transport(server: ServerBase, stream: bool) -> str:
    """The transport of an invocation that names none: its server's, or the one that streams for it."""
    spec = get_spec(server.transport)
    return spec.stream_via if stream and spec.stream_via else spec.name


def reaches(transport: str, server: ServerBase) -> bool:
    """Whether ``transport`` can reach ``server`` (same family as the server's own transport)."""
    return get_spec(transport).family == get_spec(server.transport).family


def listing_transport(server: ServerBase) -> str:
    """The transport that lists ``server``'s tools."""
    spec = get_spec(server.transport)
    return spec.list_via or spec.name
