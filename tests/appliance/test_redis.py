"""redis.url on a running appliance: the registry keeps its blob-descriptor cache in a real
redis-server (with a password from redis.password_file), a Redis that goes away costs
pulls nothing but the cache, and `check` says whether it answers (ok, then warn).

tests/recipes/test_recipe_redis.py shows what the settings render; this shows the
registry using it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.appliance import ApplianceUnderTest
from tests.support.oci import build_image


@pytest.fixture
def appliance(redis_server, tmp_path):
    password_file = tmp_path / "redis-password"
    password_file.write_text(redis_server.password + "\n")
    appliance = ApplianceUnderTest.create(
        {"redis": {"url": redis_server.url, "password_file": str(password_file)}},
        prefix="appliance-redis-",
    )
    try:
        run = appliance.reconfigure()
        assert redis_server.password not in run.stdout + run.stderr
        appliance.wait_listening()
        yield appliance
    finally:
        appliance.destroy()


def test_the_registry_caches_blob_descriptors_in_redis(appliance, redis_server, tmp_path):
    assert redis_server.keys("blobs::*") == []
    client = appliance.skopeo(tmp_path / "client")
    image = build_image(tmp_path / "image", tag="v1", random_bytes=64 * 1024)
    client.push(image, "root/cached", "v1")
    pulled = client.pull("root/cached", "v1", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest

    cached = set(redis_server.keys("blobs::*"))
    for digest in (*image.layer_digests, image.config_digest):
        assert f"blobs::{digest}" in cached
    assert "repository::root/cached::blobs" in redis_server.keys("repository::*")

    log = (appliance.root / "var/log/appliance/registry/current").read_text()
    assert redis_server.password not in log


def test_pulls_go_on_when_redis_is_gone(appliance, redis_server, tmp_path):
    client = appliance.skopeo(tmp_path / "client")
    image = build_image(tmp_path / "image", tag="v1", random_bytes=16 * 1024)
    client.push(image, "root/no-cache", "v1")
    check = appliance.ctl("check", check=False).stdout
    assert f"ok    redis: 127.0.0.1:{redis_server.port} answers PING" in check
    redis_server.stop()
    pulled = client.pull("root/no-cache", "v1", Path(tmp_path / "pulled"))
    assert pulled.layer_digests == image.layer_digests
    check = appliance.ctl("check", check=False)
    assert f"warn  redis: 127.0.0.1:{redis_server.port} does not answer PING" in check.stdout
    assert check.returncode == 0  # a warning: nothing fails without the cache
