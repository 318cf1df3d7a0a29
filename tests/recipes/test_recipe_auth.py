"""The auth recipe: where the token service listens, whose X-Real-IP it believes, and
the directories of its socket and audit log."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from appliance.auth.config import AuthConfig, from_mapping
from appliance.auth.database import PostgresDatabase
from appliance.auth.server import gunicorn_options
from appliance.errors import AuthError, ConfigError
from appliance.resources import restart
from recipes import auth, supervisor
from tests.support.recipes import SECRETS, settings_for

ROOT = Path("/srv/appliance")  # pytest's tmp_path is too long for a socket path


def by_path(resources: list, path: Path):
    [found] = [r for r in resources if getattr(r, "path", None) == path]
    return found


def written_config(settings) -> dict:
    resource = by_path(auth.resources(settings, SECRETS), settings.paths.auth_config)
    return json.loads(resource.content)


def test_by_default_the_service_listens_on_a_socket_only_nginx_may_reach():
    settings = settings_for(ROOT, run_as_root=True)
    socket = ROOT / "var/opt/appliance/auth-socket/auth.sock"
    config = written_config(settings)
    assert config["listen_addr"] == str(socket)
    resources = auth.resources(settings, SECRETS)
    directory = by_path(resources, socket.parent)
    assert (directory.owner, directory.group, directory.mode) == (
        "appliance-auth",
        "appliance-www",
        0o2750,
    )
    program = by_path(resources, supervisor.programs_dir(settings) / "auth.conf")
    assert "\numask = 007\n" in program.content.decode()
    service = auth.service(settings)
    # Beside it, the loopback internal listener: the registry's events and /metrics.
    assert (service.ready, service.binds) == (
        str(socket),
        {str(socket): "auth.listen_network", "127.0.0.1:5101": "auth.internal_addr"},
    )
    assert gunicorn_options(from_mapping(config))["bind"] == [f"unix:{socket}", "127.0.0.1:5101"]


def test_over_tcp_the_service_believes_no_forwarded_address():
    settings = settings_for(
        ROOT, run_as_root=True, auth={"listen_network": "tcp", "listen_addr": "127.0.0.1:6100"}
    )
    config = written_config(settings)
    assert config["listen_addr"] == "127.0.0.1:6100"
    assert config["trusted_proxies"] == []
    assert (ROOT / "var/opt/appliance/auth-socket") not in [
        getattr(r, "path", None) for r in auth.resources(settings, SECRETS)
    ]
    service = auth.service(settings)
    assert (service.ready, service.binds) == (
        "127.0.0.1:6100",
        {"127.0.0.1:6100": "auth.listen_addr", "127.0.0.1:5101": "auth.internal_addr"},
    )
    assert gunicorn_options(from_mapping(config))["bind"] == ["127.0.0.1:6100", "127.0.0.1:5101"]


def test_the_audit_log_has_a_directory_of_the_auth_account():
    settings = settings_for(ROOT, run_as_root=True)
    audit = ROOT / "var/log/appliance/audit"
    assert written_config(settings)["audit_log"] == str(audit / "audit.log")
    directory = by_path(auth.resources(settings, SECRETS), audit)
    assert (directory.owner, directory.group, directory.mode) == ("appliance-auth", "adm", 0o750)
    # supervisord's capture of the service's output stays in root's directory.
    captured = by_path(auth.resources(settings, SECRETS), ROOT / "var/log/appliance/auth")
    assert (captured.owner, captured.group) == ("root", "adm")


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (
            {"registry_nginx": {"hsts_max_age": -1}},
            "registry_nginx.hsts_max_age: -1 is not a number 0 or greater",
        ),
        ({"auth": {"listen_network": "udp"}}, 'auth.listen_network: "udp" is not tcp or unix'),
        (
            {"root": "/srv/" + "x" * 70},
            f"auth.listen_network: the socket path /srv/{'x' * 70}/var/opt/appliance/auth-socket/"
            f"auth.sock is longer than the 107 bytes a unix socket may have; use a shorter root, "
            f"or listen_network: tcp",
        ),
    ],
)
def test_the_new_keys_are_checked(overrides, problem):
    overrides = dict(overrides)
    root = Path(overrides.pop("root", ROOT))
    with pytest.raises(ConfigError) as caught:
        settings_for(root, **overrides)
    assert caught.value.problems == [problem]


def test_the_written_config_is_exactly_the_config_the_recipe_built():
    """One shape: what the service will load from the file equals the AuthConfig the
    recipe built, and the file carries every field (the service fills none in)."""
    for network in ("unix", "tcp"):
        settings = settings_for(ROOT, run_as_root=True, auth={"listen_network": network})
        built = auth.auth_config(settings, SECRETS)
        written = written_config(settings)
        assert list(written) == [spec.name for spec in dataclasses.fields(AuthConfig)]
        assert from_mapping(written) == built


OTHER_ROOT = Path("/srv/elsewhere")
# A value other than the default for every setting the token service's config comes
# from, and the field each one must reach.
NON_DEFAULT_SETTINGS = {
    "registry_external_url": "https://registry.example.org:6443",
    "registry": {
        "issuer": "example-issuer",
        "service": "example-registry",
        "key_path": "/etc/keys/signing.key",
        "http_addr": "127.0.0.1:5999",
    },
    "auth": {
        "listen_network": "tcp",
        "listen_addr": "127.0.0.1:6200",
        "internal_addr": "127.0.0.1:6201",
        "workers": 3,
        "threads": 5,
        "token_lifetime": 600,
        "refresh_token_lifetime": 86400,
        "database_url": "postgresql://appliance@db.example.org:5433/registry",
        "database_password_file": "/etc/appliance/database-password",
        "max_failed_logins": 4,
        "failed_login_window": 120,
        "credential_cache_ttl": 15,
        "credential_cache_size": 500,
        "refresh_tokens_per_user": 7,
    },
    "logging": {"max_bytes": 123456, "backups": 3},
    "default_projects_features": {"container_registry": False},
}
ARRIVES_AS = {
    "database": PostgresDatabase(
        "postgresql://appliance@db.example.org:5433/registry",
        OTHER_ROOT / "var/opt/appliance/auth/database-password",
    ),
    "database_password_file": str(OTHER_ROOT / "var/opt/appliance/auth/database-password"),
    "signing_key": Path("/etc/keys/signing.key"),
    "signing_certificate": OTHER_ROOT / "var/opt/appliance/auth/token-signing.crt",
    "issuer": "example-issuer",
    "service": "example-registry",
    "realm": "https://registry.example.org:6443/jwt/auth",
    "audit_log": OTHER_ROOT / "var/log/appliance/audit/audit.log",
    "listen_addr": "127.0.0.1:6200",
    "workers": 3,
    "threads": 5,
    "token_lifetime": 600,
    "refresh_token_lifetime": 86400,
    "trusted_proxies": (),  # fixed by the recipe: see recipes/auth.auth_config
    "rate_limit_window": 120,
    "rate_limit_user_failures": 4,
    "rate_limit_address_failures": 12,
    "rate_limit_account_failures": 40,
    "refresh_tokens_per_user": 7,
    "audit_log_max_bytes": 123456,
    "audit_log_backups": 3,
    "credential_cache_ttl": 15,
    "credential_cache_size": 500,
    "default_registry_enabled": False,
    "internal_addr": "127.0.0.1:6201",
    # from the secrets file, not a setting: the same for both roots
    "events_secret_digest": hashlib.sha256(b"events-secret").hexdigest(),
    "usage_file": OTHER_ROOT / "var/opt/appliance/registry-usage.json",
    "gc_stats_file": OTHER_ROOT / "var/opt/appliance/registry-gc.json",
    "registry_address": "127.0.0.1:5999",
    "maintenance_file": OTHER_ROOT / "var/opt/appliance/registry-maintenance.json",
}


def test_every_field_of_the_service_config_comes_from_the_settings():
    default = auth.auth_config(settings_for(ROOT), SECRETS)
    custom = auth.auth_config(settings_for(OTHER_ROOT, **NON_DEFAULT_SETTINGS), SECRETS)
    assert custom == AuthConfig(**ARRIVES_AS)
    # Each field followed its setting away from the default (none is set by the recipe
    # alone), except the proxies the service never believes over TCP.
    unchanged = [
        spec.name
        for spec in dataclasses.fields(AuthConfig)
        if getattr(custom, spec.name) == getattr(default, spec.name)
    ]
    assert unchanged == ["trusted_proxies", "events_secret_digest"]


def test_a_sqlite_database_path_arrives_as_the_service_database():
    custom = auth.auth_config(
        settings_for(OTHER_ROOT, auth={"database_path": "/srv/db/users.db"}), SECRETS
    )
    assert (custom.database, custom.database_password_file) == (Path("/srv/db/users.db"), "")


def test_the_postgresql_password_is_copied_for_the_service_and_masked(tmp_path):
    """The admin's file may be root's alone: the service gets its own copy, 0600, whose
    content never reaches a diff."""
    admin_file = tmp_path / "db-password"
    admin_file.write_text("s3cret-pw\nignored second line\n")
    settings = settings_for(
        ROOT,
        auth={
            "database_url": "postgresql://appliance@db.example.org/registry",
            "database_password_file": str(admin_file),
        },
    )
    [copy] = [
        r for r in auth.resources(settings, SECRETS) if str(r.name).endswith("database-password")
    ]
    assert (copy.content, copy.mode, copy.sensitive) == (b"s3cret-pw\n", 0o600, True)
    admin_file.unlink()
    with pytest.raises(AuthError, match="password file .* cannot be read"):
        auth.resources(settings, SECRETS)


def test_on_the_registry_socket_the_auth_account_joins_the_web_group():
    """The tag rules ask the registry on its socket, whose directory admits the web
    server's group only; over TCP (or run as an ordinary user) no membership is needed."""

    def memberships(**overrides):
        settings = settings_for(ROOT, run_as_root=True, **overrides)
        return [
            (r.username, r.group, r.notifies)
            for r in auth.resources(settings, SECRETS)
            if isinstance(r, auth.GroupMember)
        ]

    assert memberships(registry={"listen_network": "unix"}) == [
        ("appliance-auth", "appliance-www", (restart("auth"),))
    ]
    assert memberships() == []
    assert memberships(registry={"listen_network": "unix"}, manage_accounts=False) == []
