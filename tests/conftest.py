"""Fixtures every test level may ask for by name."""

from tests.support.postgres import (  # noqa: F401 - fixtures, found by name
    auth_database,
    postgres_database,
    postgres_server,
)
