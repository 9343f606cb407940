"""The services are siblings: each imports berthd.common and the berth client package, never
another service's package, and calls other services only through the async client layer.

Read from the source with `ast`, so a new import or a new blocking client breaks this test.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

BERTHD = Path(__file__).resolve().parents[2] / "services" / "berthd"
SERVICES = ("registry", "image", "builder", "node", "cluster")
# The one module allowed to open channels to other services.
CHANNELS_MODULE = BERTHD / "common" / "rpc" / "channels.py"


def modules(package: Path) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(package.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def imported_modules(tree: ast.Module) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names) of every import; `import a.b` gives ("a.b", [])."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def attribute_calls(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every call of an attribute chain, like grpc.aio.insecure_channel."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts = []
            target = node.func
            while isinstance(target, ast.Attribute):
                parts.append(target.attr)
                target = target.value
            if isinstance(target, ast.Name):
                parts.append(target.id)
                yield node.lineno, ".".join(reversed(parts))


def test_the_five_service_packages_exist() -> None:
    # A rename would otherwise make every check below pass on nothing.
    for service in SERVICES:
        assert (BERTHD / service / "__init__.py").is_file(), service


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = {f"berthd.{other}" for other in SERVICES if other != service}
    found = []
    for path, tree in modules(BERTHD / service):
        for line, module, names in imported_modules(tree):
            targets = [module] + [f"{module}.{name}" for name in names]
            if any(t == o or t.startswith(o + ".") for t in targets for o in others):
                found.append(f"{path.relative_to(BERTHD)}:{line} imports {module}")
    assert not found, "\n".join(found)


def test_common_imports_no_service() -> None:
    services = tuple(f"berthd.{s}" for s in SERVICES)
    found = [
        f"{path.relative_to(BERTHD)}:{line} imports {module}"
        for path, tree in modules(BERTHD / "common")
        for line, module, names in imported_modules(tree)
        if module.startswith(services)
        or (module == "berthd" and any(name in SERVICES for name in names))
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("package", [*SERVICES, "common"])
def test_services_use_no_blocking_grpc_client(package: str) -> None:
    """The public client's blocking classes (RegistryClient, ClusterClient, ...) and sync
    channels block the event loop, or need a thread around every call: a service calls others
    through berthd.common.rpc instead. The client package's dataclasses and converters are
    fine."""
    found = []
    for path, tree in modules(BERTHD / package):
        where = path.relative_to(BERTHD)
        for line, module, names in imported_modules(tree):
            if module.startswith("berth.client"):
                found += [f"{where}:{line} imports {n}" for n in names if n.endswith("Client")]
            if module == "grpc.experimental":
                found.append(f"{where}:{line} imports {module}")
        for line, call in attribute_calls(tree):
            sync_channel = call in ("grpc.insecure_channel", "grpc.secure_channel")
            aio_channel = call in ("grpc.aio.insecure_channel", "grpc.aio.secure_channel")
            if sync_channel or (aio_channel and path != CHANNELS_MODULE):
                found.append(f"{where}:{line} opens a channel with {call}")
    assert not found, "\n".join(found)


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The helpers above find what they look for (guards against a check that cannot fail)."""
    source = (
        "import asyncio\nfrom berth.client import RegistryClient\n"
        "from berthd.node.spec import X\nimport grpc\n"
        "async def f():\n    await asyncio.to_thread(grpc.insecure_channel, 'a')\n"
        "    grpc.insecure_channel('a')\n"
    )
    tree = ast.parse(source)
    imports = list(imported_modules(tree))
    assert (2, "berth.client", ["RegistryClient"]) in imports
    assert (3, "berthd.node.spec", ["X"]) in imports
    assert (7, "grpc.insecure_channel") in list(attribute_calls(tree))
