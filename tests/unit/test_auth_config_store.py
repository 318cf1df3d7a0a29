"""The service's JSON config (schema, every problem at once) and the database functions
the reconfigure recipe calls: schema_version and user_exists to read, ensure_schema and
ensure_admin to act."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from appliance.auth import config as auth_config
from appliance.auth import credentials
from appliance.auth.store import (
    MIGRATIONS,
    Store,
    ensure_admin,
    ensure_schema,
    schema_version,
    user_exists,
)
from appliance.errors import ConfigError
from tests.support.auth_requests import use_cheap_hasher

COMPLETE = {
    "database": "/var/opt/appliance/auth/auth.db",
    "signing_key": "/etc/appliance/ssl/token.key",
    "signing_certificate": "/etc/appliance/ssl/token.crt",
    "issuer": "appliance-token-issuer",
    "service": "container_registry",
    "realm": "https://registry.example.com/jwt/auth",
    "audit_log": "/var/log/appliance/auth/audit.log",
    "listen_addr": "127.0.0.1:5001",
    "workers": 2,
    "threads": 4,
    "token_lifetime": 300,
    "refresh_token_lifetime": 2592000,
    "trusted_proxies": ["127.0.0.1", "::1"],
    "rate_limit_window": 300,
    "rate_limit_user_failures": 10,
    "rate_limit_address_failures": 30,
    "rate_limit_account_failures": 100,
    "refresh_tokens_per_user": 50,
    "audit_log_max_bytes": 52428800,
    "audit_log_backups": 10,
    "credential_cache_ttl": 30,
    "credential_cache_size": 10000,
    "default_registry_enabled": True,
    "internal_addr": "127.0.0.1:5101",
    "events_secret_digest": "0" * 64,
    "usage_file": "/var/opt/appliance/registry-usage.json",
    "gc_stats_file": "/var/opt/appliance/registry-gc.json",
    "registry_address": "127.0.0.1:5000",
    "maintenance_file": "/var/opt/appliance/registry-maintenance.json",
    "database_password_file": "",
}


def test_a_complete_config_loads_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(COMPLETE))
    config = auth_config.load(path)
    assert config.database == Path(COMPLETE["database"])
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 5001)
    assert config.trusted_proxies == ("127.0.0.1", "::1")
    assert config.default_registry_enabled is True
    assert auth_config.from_mapping(auth_config.to_mapping(config)) == config
    assert config.to_mapping() == COMPLETE


@pytest.mark.parametrize("field", sorted(COMPLETE))
def test_a_missing_field_is_named_not_defaulted(tmp_path: Path, field: str) -> None:
    """No field has a default of its own that could disagree with the settings: a file
    without one (written by an older version, say) is refused, naming it and the fix."""
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({k: v for k, v in COMPLETE.items() if k != field}))
    with pytest.raises(ConfigError) as raised:
        auth_config.load(path)
    assert str(raised.value) == (
        f"Invalid {path}: {field}: required; run 'appliance-ctl reconfigure' to write it again."
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    raw = {
        **COMPLETE,
        "database": "relative.db",
        "workers": "two",
        "trusted_proxies": ["nope"],
        "listen_addr": "localhost",
        "tokn_lifetime": 5,
    }
    del raw["issuer"]
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as raised:
        auth_config.load(path)
    message = str(raised.value)
    for problem in (
        "tokn_lifetime: unknown setting",
        "issuer: required",
        "database: must be an absolute path",
        "workers: must be a non-negative",
        "'nope' is not an address",
        "listen_addr: must be host:port",
    ):
        assert problem in message


def test_unreadable_or_broken_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read the auth config"):
        auth_config.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        auth_config.load(tmp_path / "bad.json")


def test_ensure_schema_is_idempotent_and_uses_wal(tmp_path: Path) -> None:
    db = tmp_path / "data" / "auth.db"
    ensure_schema(db)
    ensure_schema(db)
    connection = sqlite3.connect(db)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert {
        "users",
        "projects",
        "memberships",
        "personal_access_tokens",
        "deploy_tokens",
        "refresh_tokens",
        "failed_signins",
    } <= tables
    assert db.stat().st_mode & 0o777 == 0o600


def test_ensure_admin_creates_once_and_never_changes_the_password(tmp_path, monkeypatch):
    use_cheap_hasher(monkeypatch)
    db = tmp_path / "auth.db"
    ensure_schema(db)
    assert ensure_admin(db, "root", "first password") is True
    assert ensure_admin(db, "root", "other password") is False
    root = Store(db).user("root")
    assert root.admin
    assert credentials.verify_password(root.password_hash, "first password")
    assert not credentials.verify_password(root.password_hash, "other password")


def test_the_recipe_reads_the_database_without_creating_or_changing_it(tmp_path, monkeypatch):
    """What the recipe's plan (and a dry run) asks: no database yet, an empty file
    (schema 0, no users table), the latest schema without and then with the admin."""
    use_cheap_hasher(monkeypatch)
    db = tmp_path / "auth.db"
    assert (schema_version(db), user_exists(db, "root")) == (None, False)
    assert list(tmp_path.iterdir()) == []  # asking created nothing
    sqlite3.connect(db).close()
    assert (schema_version(db), user_exists(db, "root")) == (0, False)
    db.unlink()
    ensure_schema(db)
    before = db.read_bytes()
    assert (schema_version(db), user_exists(db, "root")) == (len(MIGRATIONS), False)
    assert db.read_bytes() == before
    ensure_admin(db, "root", "a password")
    assert (user_exists(db, "root"), user_exists(db, "alice")) == (True, False)


def test_stored_secrets_are_hashes(tmp_path: Path, monkeypatch) -> None:
    use_cheap_hasher(monkeypatch)
    db = tmp_path / "auth.db"
    ensure_schema(db)
    store = Store(db)
    store.create_user("alice", credentials.hash_password("alice password"))
    store.create_project("team/app", "private", True)
    _, pat = store.create_personal_access_token("alice", "ci", ["read_registry"], None)
    _, deploy = store.create_deploy_token("team/app", "ci", ["read_registry"], None)
    raw = db.read_bytes() + Path(f"{db}-wal").read_bytes()
    for secret in (b"alice password", pat.encode(), deploy.encode()):
        assert secret not in raw
    assert store.user("alice").password_hash.startswith("$argon2id$")


def test_server_refuses_a_missing_or_old_database(tmp_path: Path, capsys) -> None:
    from appliance.auth import server
    from tests.support.auth_server import write_signing_material

    key, cert = write_signing_material(tmp_path)
    raw = {
        **COMPLETE,
        "database": str(tmp_path / "auth.db"),
        "signing_key": str(key),
        "signing_certificate": str(cert),
        "audit_log": str(tmp_path / "audit.log"),
    }
    config_path = tmp_path / "auth.json"
    config_path.write_text(json.dumps(raw))
    assert server.main(["--config", str(config_path)]) == 2
    assert "does not exist; run 'appliance-ctl reconfigure'" in capsys.readouterr().err
    sqlite3.connect(tmp_path / "auth.db").close()  # an empty file: schema version 0
    assert server.main(["--config", str(config_path)]) == 2
    needs = f"has schema version 0, this service needs {len(MIGRATIONS)}"
    assert needs in capsys.readouterr().err


def test_server_reports_a_bad_key_in_one_line(tmp_path: Path, capsys) -> None:
    from appliance.auth import server

    ensure_schema(tmp_path / "auth.db")
    (tmp_path / "bad.key").write_text("not a key")
    raw = {
        **COMPLETE,
        "database": str(tmp_path / "auth.db"),
        "signing_key": str(tmp_path / "bad.key"),
        "audit_log": str(tmp_path / "audit.log"),
    }
    config_path = tmp_path / "auth.json"
    config_path.write_text(json.dumps(raw))
    assert server.main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("appliance-auth: The token-signing key") and err.count("\n") == 1
