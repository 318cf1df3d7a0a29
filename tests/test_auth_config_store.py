"""The service's JSON config (schema, every problem at once) and the database functions
the reconfigure recipe calls: ensure_schema and ensure_admin."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from appliance.auth import config as auth_config
from appliance.auth import credentials
from appliance.auth.store import MIGRATIONS, Store, ensure_admin, ensure_schema
from appliance.errors import ConfigError
from tests.support.auth_requests import use_cheap_hasher

MINIMAL = {
    "database": "/var/opt/appliance/auth/auth.db",
    "signing_key": "/etc/appliance/ssl/token.key",
    "signing_certificate": "/etc/appliance/ssl/token.crt",
    "issuer": "appliance-token-issuer",
    "service": "container_registry",
    "realm": "https://registry.example.com/jwt/auth",
    "audit_log": "/var/log/appliance/auth/audit.log",
}


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(MINIMAL))
    config = auth_config.load(path)
    assert config.database == Path(MINIMAL["database"])
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 5001)
    assert config.trusted_proxies == ("127.0.0.1", "::1")
    assert config.default_registry_enabled is True
    assert auth_config.from_mapping(auth_config.to_mapping(config)) == config


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    raw = {
        **MINIMAL,
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
        **MINIMAL,
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
    assert "has schema version 0, this service needs 1" in capsys.readouterr().err


def test_server_reports_a_bad_key_in_one_line(tmp_path: Path, capsys) -> None:
    from appliance.auth import server

    ensure_schema(tmp_path / "auth.db")
    (tmp_path / "bad.key").write_text("not a key")
    raw = {
        **MINIMAL,
        "database": str(tmp_path / "auth.db"),
        "signing_key": str(tmp_path / "bad.key"),
        "audit_log": str(tmp_path / "audit.log"),
    }
    config_path = tmp_path / "auth.json"
    config_path.write_text(json.dumps(raw))
    assert server.main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("appliance-auth: The token-signing key") and err.count("\n") == 1
