"""redis: {url, password_file}: what the registry's config gets, and what is refused.

Pure: settings in, the registry's config parsed back. That the registry really keeps its
cache there is tests/appliance/test_redis.py's business.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from appliance.errors import ConfigError
from recipes import registry
from tests.support.recipes import SECRETS, settings_for


def rendered(root: Path, **overrides: object) -> dict:
    settings = settings_for(root, **overrides)
    config = next(
        r
        for r in registry.resources(settings, SECRETS)
        if getattr(r, "path", None) == settings.paths.registry_config
    )
    return yaml.safe_load(config.content)


def problems(root: Path, **overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings_for(root, **overrides)
    return caught.value.problems


def test_without_redis_the_registry_has_no_redis_section_and_no_shared_cache(tmp_path):
    config = rendered(tmp_path)
    assert "redis" not in config
    assert "cache" not in config["storage"]


def test_redis_url_renders_the_section_and_the_blob_descriptor_cache(tmp_path):
    config = rendered(tmp_path, redis={"url": "redis://10.0.0.5:6380/2"})
    assert config["redis"]["addr"] == "10.0.0.5:6380"
    assert config["redis"]["db"] == 2
    assert "password" not in config["redis"]
    # short timeouts: a Redis that is down costs a request a dial timeout, not a hang
    assert config["redis"]["dialtimeout"] == "1s"
    assert config["storage"]["cache"] == {"blobdescriptor": "redis"}


def test_port_and_database_have_redis_defaults(tmp_path):
    config = rendered(tmp_path, redis={"url": "redis://cache.internal"})
    assert (config["redis"]["addr"], config["redis"]["db"]) == ("cache.internal:6379", 0)


def test_the_read_only_config_of_a_maintenance_window_uses_the_same_redis(tmp_path):
    settings = settings_for(tmp_path, redis={"url": "redis://10.0.0.5/1"})
    readonly = next(
        r
        for r in registry.resources(settings, SECRETS)
        if getattr(r, "path", None) == registry.readonly_config(settings)
    )
    config = yaml.safe_load(readonly.content)
    assert config["redis"]["addr"] == "10.0.0.5:6379"
    assert config["storage"]["cache"] == {"blobdescriptor": "redis"}


def test_an_admins_own_cache_setting_is_kept(tmp_path):
    config = rendered(
        tmp_path,
        redis={"url": "redis://10.0.0.5/0"},
        registry={"storage": {"cache": {"blobdescriptor": "inmemory"}}},
    )
    assert config["storage"]["cache"] == {"blobdescriptor": "inmemory"}


def test_the_password_comes_from_its_file_and_is_masked_in_the_registry_log(tmp_path):
    secret = tmp_path / "redis-password"
    secret.write_text("correct-horse-battery\n")
    overrides = {"redis": {"url": "redis://10.0.0.5/0", "password_file": str(secret)}}
    assert rendered(tmp_path, **overrides)["redis"]["password"] == "correct-horse-battery"
    settings = settings_for(tmp_path, **overrides)
    assert "correct-horse-battery" in registry.program_description(settings, SECRETS)["secrets"]


def test_a_missing_or_empty_password_file_is_one_sentence(tmp_path):
    missing = tmp_path / "nope"
    settings = settings_for(tmp_path, redis={"url": "redis://h/0", "password_file": str(missing)})
    with pytest.raises(ConfigError, match=r"redis.password_file: cannot read .*nope"):
        registry.resources(settings, SECRETS)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    settings = settings_for(tmp_path, redis={"url": "redis://h/0", "password_file": str(empty)})
    with pytest.raises(ConfigError, match=r"redis.password_file: .*empty is empty"):
        registry.resources(settings, SECRETS)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://10.0.0.5:6379/0", "starting with redis://"),
        ("redis://10.0.0.5:6379/zero", "at most a database number"),
        ("redis://10.0.0.5:6379/0?timeout=1", "at most a database number"),
        ("redis://10.0.0.5:99999/0", "a port 1-65535"),
        ("redis://:hunter2@10.0.0.5/0", "put the password in redis.password_file"),
    ],
)
def test_a_bad_url_is_named_with_an_example(tmp_path, url, problem):
    (found,) = problems(tmp_path, redis={"url": url})
    assert found.startswith("redis.url: ")
    assert problem in found
    assert "redis://10.0.0.5:6379/0" in found
    assert "hunter2" not in found


def test_a_password_file_without_url_and_a_redis_cache_without_redis_are_refused(tmp_path):
    found = problems(
        tmp_path,
        redis={"password_file": "/etc/appliance/redis-password"},
        registry={"storage": {"cache": {"blobdescriptor": "redis"}}},
    )
    assert found == [
        "redis.password_file: set only with redis.url (the Redis it is the password of)",
        "registry.storage.cache.blobdescriptor: redis needs redis.url, the Redis to keep "
        "the cache in",
    ]
