"""pytest plugin: a real tritonserver over the tiny repository.

Loaded by tests/conftest.py (`pytest_plugins = ["tests.triton_fixtures"]`),
which provides `tiny_repository`. The server is started once per session on
free loopback ports; tests that stop it (health flip) must start it again.
On a failed start the error carries the server's log tail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from triton_local.runner import LocalTriton


@pytest.fixture(scope="session")
def triton_server(tiny_repository: Path) -> Iterator[LocalTriton]:
    server = LocalTriton(tiny_repository, startup_timeout_s=180)
    server.start()
    yield server
    server.close()


@pytest.fixture
def running_triton(triton_server: LocalTriton) -> LocalTriton:
    """The session server, started again if an earlier test left it stopped."""
    if not triton_server.is_running():
        triton_server.start()
    return triton_server
