"""pyproject.toml declares what the package imports, and imports (or knowingly runs) what it declares.

The imports of the shipped packages are read with :mod:`ast` (every ``import``, also inside functions and
``TYPE_CHECKING`` blocks); each third-party top-level module is mapped to the distribution that installs it
with :func:`importlib.metadata.packages_distributions` (``yaml`` -> PyYAML, ``mcp_types`` -> mcp-types).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections import defaultdict
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The packages the wheel ships (pyproject's ``[tool.setuptools] packages``, by their top folder).
PACKAGES = ("workers", "tasks", "config", "devkit")

#: Declared distributions the package never imports, and why each is declared anyway.
NOT_IMPORTED = {
    "sniffio": "httpcore imports it on every request when present; missing, each try searches sys.path "
               "(~3% of a worker's CPU, see the comment in pyproject.toml)",
    "flower": "run as a command (`celery -A workers.app flower`, docker-compose.yml)",
    "mcp-server-time": "an MCP server the registry starts over stdio (`{bin}/mcp-server-time`, "
                       "config/servers.yaml); the `servers` extra",
}
#: Extras of ``[project.optional-dependencies]`` that the deployed package needs (``dev`` is not one).
RUNTIME_EXTRAS = ("servers",)


def _normalize(name: str) -> str:
    """PEP 503 name: ``PyYAML`` -> ``pyyaml``, ``httpx_sse`` -> ``httpx-sse``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    """``celery[redis]>=5.7,<5.8`` -> ``celery``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparsable requirement {requirement!r}"
    return _normalize(match.group(1))


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def declared(*, extras: tuple[str, ...] = ()) -> set[str]:
    """Distributions in ``[project] dependencies`` (plus the given extras), normalized."""
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    names = {_requirement_name(r) for r in project["dependencies"]}
    for extra in extras:
        names |= {_requirement_name(r) for r in project["optional-dependencies"][extra]}
    return names


def third_party_imports() -> dict[str, list[str]]:
    """Top-level third-party module -> where it is imported (``path:line``)."""
    first_party = set(PACKAGES)
    found: dict[str, list[str]] = defaultdict(list)
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.partition(".")[0]
                    if top in first_party or top in sys.stdlib_module_names or top == "__future__":
                        continue
                    found[top].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return dict(found)


def _distributions_of() -> dict[str, set[str]]:
    return {module: {_normalize(d) for d in dists} for module, dists in packages_distributions().items()}


def test_the_scan_sees_the_known_imports() -> None:
    imports = third_party_imports()
    assert {"celery", "redis", "httpx", "httpcore", "anyio", "mcp", "mcp_types", "yaml"} <= set(imports)


def test_every_imported_package_is_declared() -> None:
    runtime = declared()
    distributions = _distributions_of()
    problems = []
    for module, where in sorted(third_party_imports().items()):
        dists = distributions.get(module)
        if not dists:
            problems.append(f"{module} (imported at {where[0]}) is installed by no distribution in this venv")
        elif not dists & runtime:
            problems.append(f"{module} (imported at {where[0]}) comes from {'/'.join(sorted(dists))}, which "
                            "pyproject.toml's [project] dependencies do not declare")
    assert not problems, "\n".join(problems)


def test_every_declared_package_is_imported_or_has_a_reason() -> None:
    runtime = declared(extras=RUNTIME_EXTRAS)
    distributions = _distributions_of()
    imported = {dist for module in third_party_imports() for dist in distributions.get(module, ())}
    unused = sorted(runtime - imported - set(NOT_IMPORTED))
    assert not unused, (f"declared but never imported by {', '.join(PACKAGES)}: {unused}; remove them from "
                        "pyproject.toml (with a comment saying why) or list them in NOT_IMPORTED with the reason")


def test_the_reasons_are_not_stale() -> None:
    runtime = declared(extras=RUNTIME_EXTRAS)
    distributions = _distributions_of()
    imported = {dist for module in third_party_imports() for dist in distributions.get(module, ())}
    assert set(NOT_IMPORTED) <= runtime, f"no longer declared: {sorted(set(NOT_IMPORTED) - runtime)}"
    assert not set(NOT_IMPORTED) & imported, f"imported after all: {sorted(set(NOT_IMPORTED) & imported)}"
