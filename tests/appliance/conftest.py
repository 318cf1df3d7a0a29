"""Fixtures every module of the appliance level may ask for by name."""

from tests.support.redis import redis_server  # noqa: F401 - redis-server, as a fixture
from tests.support.s3 import s3_server  # noqa: F401 - the moto server, as a fixture
