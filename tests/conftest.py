"""Fixtures every test level may ask for by name, and how ./run-tests spreads the tests."""

from pathlib import Path

import pytest

from tests.support.postgres import (  # noqa: F401 - fixtures, found by name
    auth_database,
    postgres_database,
    postgres_server,
)

# ./run-tests runs the suite on two workers (pytest-xdist, --dist loadgroup). The
# appliance tests spend most of their time waiting (a handover's settle time, a pull
# loop across a change, a process starting): the handover, key rotation and registry
# settings files took 66 CPU-seconds in 222 s on one worker. Each test file stays on one
# worker, so a module's appliance is built once; the package tests share one build and
# one apt cache, so they run together.
PACKAGE_TESTS = Path(__file__).parent / "package"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path)
        group = "package" if PACKAGE_TESTS in path.parents else str(path)
        item.add_marker(pytest.mark.xdist_group(group))
