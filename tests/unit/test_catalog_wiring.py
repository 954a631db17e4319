"""What reads the transport catalog stays right when the catalog changes or is read from many threads: the
registry's validator, the Celery app's queues, and which transports a worker builds for its queues."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from config import registry as registry_module
from config.registry import GatewayServer, Registry, RegistryError, ServerBase, StdioServer, load_registry
from config.settings import Settings
from config.transports import PLUGINS_VARIABLE
from tests.helpers import clients_configured
from workers.runtime import transports_for_queues

REGISTRY = """
servers:
  echo: {transport: http}
  time: {transport: stdio, command: /bin/true}
"""


@pytest.fixture()
def toy_catalog() -> Iterator[None]:
    with clients_configured({PLUGINS_VARIABLE: "tests.toy_transport"}):
        yield


def test_concurrent_first_loads_all_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    # The validator is built on first use; 16 threads using it at once each must see a whole one (a half-built
    # pair once raised KeyError from a client's concurrent first apply_async).
    entries = {name: {**entry, "name": name} for name, entry in yaml.safe_load(REGISTRY)["servers"].items()}
    failures: list[BaseException] = []
    built = registry_module.TypeAdapter

    def slow_adapter(*args: object, **kwargs: object) -> object:
        time.sleep(0.02)  # building the validator takes a while: other threads arrive meanwhile
        return built(*args, **kwargs)

    monkeypatch.setattr(registry_module, "TypeAdapter", slow_adapter)
    for _ in range(3):
        registry_module._adapter = None
        start = threading.Barrier(16)

        def load(start: threading.Barrier = start) -> None:
            start.wait()
            try:
                loaded = Registry.model_validate({"servers": entries})
                assert isinstance(loaded.get("time"), StdioServer)
            except BaseException as exc:  # collected and reported below
                failures.append(exc)

        threads = [threading.Thread(target=load) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert failures == []


def test_a_plugin_that_does_not_import_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "servers.yaml"
    path.write_text(REGISTRY)
    with clients_configured({PLUGINS_VARIABLE: "tests.no_such_plugin_module"}), \
            pytest.raises(RegistryError, match="no_such_plugin_module"):
        load_registry(path)


def test_models_given_directly_must_be_their_transports_model() -> None:
    echo = GatewayServer(transport="http", name="echo")
    assert Registry(servers={"echo": echo}).get("echo") is echo
    with pytest.raises(ValueError, match="must be a GatewayServer"):
        Registry(servers={"echo": ServerBase(transport="http", name="echo")})
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'"):
        Registry(servers={"x": ServerBase(transport="carrier-pigeon", name="x")})


def test_a_dump_keeps_each_entrys_own_fields(tmp_path: Path) -> None:
    path = tmp_path / "servers.yaml"
    path.write_text(REGISTRY)
    dumped = load_registry(path).model_dump()["servers"]
    assert dumped["time"]["command"] == "/bin/true"
    assert "server_id" in dumped["echo"]


def test_the_app_declares_every_transports_queue(toy_catalog: None) -> None:
    # A worker started without -Q consumes task_queues: a plug-in's queue and streamable-http's included.
    from workers.app import create_app

    app = create_app(Settings(queue_stdio="sark.stdio.custom"))
    try:
        names = [queue.name for queue in app.conf.task_queues]
    finally:
        app.close()
    assert names[0] == "sark.http"
    assert {"sark.sse", "sark.stdio.custom", "sark.streamable-http", "sark.toy"} <= set(names)
    assert len(names) == len(set(names))


def test_a_worker_builds_the_transports_of_its_queues(toy_catalog: None) -> None:
    settings = Settings()
    assert transports_for_queues(settings, ["sark.toy"]) == ["toy"]
    assert set(transports_for_queues(settings, ["sark.http", "sark.stdio"])) == {"http", "stdio"}
    every = transports_for_queues(settings, None)
    assert {"http", "sse", "stdio", "streamable-http", "toy"} <= set(every)
    # A queue of no transport (a custom route) may be sent anything: mixed with a transport's queue or not.
    assert transports_for_queues(settings, ["custom"]) == every
    assert transports_for_queues(settings, ["sark.http", "custom"]) == every


def test_an_app_imports_with_a_broken_plugin() -> None:
    # A plug-in that does not import must not make `import workers.app` (clients, the worker) crash: the
    # built-in queues are declared, and check-config names the problem.
    from workers.app import create_app

    with clients_configured({PLUGINS_VARIABLE: "tests.no_such_plugin_module"}):
        app = create_app(Settings())
        try:
            assert [queue.name for queue in app.conf.task_queues] == ["sark.http", "sark.sse", "sark.stdio"]
        finally:
            app.close()
