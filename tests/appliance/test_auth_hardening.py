"""Attacks on the token service (issue 10, defects 1, 5, 6 and the auth.db-wal part of
10; issue 17, defect 5), each performed as an attacker would and shown to fail: a
password oracle through the credential cache, an audit log grown without bound, refresh
tokens and client ids grown without bound, a linked auth.db-wal, and a log disk that
fills up."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from appliance import pki
from appliance.auth import credentials, server
from appliance.auth import store as auth_store
from appliance.auth.app import MAX_CLIENT_ID, TokenService
from appliance.auth.audit import AuditLog
from appliance.auth.config import to_mapping
from appliance.auth.store import Store
from appliance.errors import AuthError
from recipes.auth import AuthDatabase
from tests.support.auth_requests import call, token_query, use_cheap_hasher
from tests.support.auth_server import AuthServer, make_config

PASSWORD = "correct horse battery"
SCOPE = "repository:team/app:pull"
CTL = Path(sys.prefix) / "bin/appliance-ctl"


def get_token(url: str, user: str, password: str, address: str) -> int:
    """One token request through a client at `address` (nginx's X-Real-IP), its status."""
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{url}/jwt/auth?service=container_registry&scope={SCOPE}",
        headers={"Authorization": f"Basic {basic}", "X-Real-IP": address},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def populate(config) -> None:
    store = Store(config.database)
    store.create_user("victim", credentials.hash_password(PASSWORD))  # production argon2
    store.create_project("team/app", "private", True)
    store.add_member("team/app", "victim", "reporter")
    store.close()


@pytest.fixture
def real_service(tmp_path: Path):
    """appliance-auth under gunicorn, two workers, each caching verified passwords."""
    config = make_config(
        tmp_path,
        credential_cache_ttl=300,
        rate_limit_user_failures=5,
        rate_limit_address_failures=15,
        rate_limit_account_failures=20,
    )
    populate(config)
    service = AuthServer(config, tmp_path / "auth.json").start()
    yield service
    service.stop()


# -- defect 1: the rate limit is not a password oracle --------------------------------
def test_a_locked_guesser_gets_no_200_for_the_right_password(real_service) -> None:
    """The victim's client signs in again and again (its password cached by both
    workers); the attacker floods wrong guesses until locked, then hides the right
    password among wrong ones. Before the fix, every right guess got 200 from the cache."""
    url, victim, attacker = real_service.url, "198.51.100.10", "203.0.113.66"
    for _ in range(12):
        assert get_token(url, "victim", PASSWORD, victim) == 200
    answers = []
    while not answers or answers[-1] != 429:
        answers.append(get_token(url, "victim", "wrong guess", attacker))
        assert len(answers) <= 6, answers
    assert answers == [401] * 5 + [429]

    right_while_locked = []
    for n in range(60):
        guess = PASSWORD if n % 6 == 0 else f"wrong guess {n}"
        status = get_token(url, "victim", guess, attacker)
        assert status == 429, (n, status)
        if guess == PASSWORD:
            right_while_locked.append(status)
    assert len(right_while_locked) == 10
    assert right_while_locked.count(200) == 0

    # What was chosen instead of the old cache exemption: the lock is per (username,
    # address), so the victim's own client keeps working while the attacker is locked.
    assert [get_token(url, "victim", PASSWORD, victim) for _ in range(6)] == [200] * 6


def test_guessing_from_many_addresses_locks_the_account_for_everyone(real_service) -> None:
    """Spreading guesses over addresses reaches the account's own limit (20 here); from
    then on nobody, the cached victim included, learns anything: every answer is 429."""
    url, victim = real_service.url, "198.51.100.10"
    for _ in range(8):
        assert get_token(url, "victim", PASSWORD, victim) == 200
    failures = 0
    for host in range(1, 5):  # 4 addresses x 5 failures: the account's 20
        for _ in range(5):
            assert get_token(url, "victim", "wrong guess", f"192.0.2.{host}") == 401
            failures += 1
    assert failures == 20
    right = [get_token(url, "victim", PASSWORD, f"192.0.2.{host}") for host in range(5, 15)]
    right += [get_token(url, "victim", PASSWORD, victim) for _ in range(6)]
    assert right.count(200) == 0 and set(right) == {429}


@pytest.fixture
def service(tmp_path: Path, monkeypatch) -> TokenService:
    use_cheap_hasher(monkeypatch)
    config = make_config(
        tmp_path,
        rate_limit_user_failures=3,
        rate_limit_address_failures=5,
        rate_limit_account_failures=30,
        refresh_tokens_per_user=50,
    )
    store = Store(config.database)
    store.create_user("alice", credentials.hash_password(PASSWORD))
    store.create_project("team/app", "private", True)
    store.add_member("team/app", "alice", "developer")
    return TokenService(config)


def offline_login(service: TokenService, client_id: str = "docker", peer: str = "127.0.0.1"):
    return call(
        service,
        query=token_query(offline_token="true", client_id=client_id),
        basic=("alice", PASSWORD),
        peer=peer,
    )


def refresh(service: TokenService, token: str, peer: str = "127.0.0.1"):
    form = {"grant_type": "refresh_token", "refresh_token": token, "service": "container_registry"}
    return call(service, method="POST", form=form, peer=peer)


# -- defect 5: every failure path is limited; the audit log is bounded -----------------
def test_failed_refresh_tokens_are_rate_limited_per_address(service) -> None:
    good = offline_login(service).body["refresh_token"]
    statuses = [refresh(service, f"guess-{n}", peer="10.9.9.9").status for n in range(7)]
    assert statuses == [401] * 5 + [429] * 2
    limited = refresh(service, good, peer="10.9.9.9")  # even a valid one: nothing to learn
    assert limited.status == 429 and "your address" in limited.message
    assert refresh(service, good, peer="10.9.9.8").status == 200


def test_bad_requests_count_against_the_address(service) -> None:
    query = token_query(SCOPE, service="someone-else")
    statuses = [call(service, query=query, peer="10.7.7.7").status for _ in range(7)]
    assert statuses == [400] * 5 + [429] * 2


def test_an_audit_record_holds_a_bounded_amount(service) -> None:
    """A 60,000-character username and a thousand 300-character scopes used to write
    ~64 KiB a request; now a record is cut, and says so."""
    scopes = [f"repository:team/{'x' * 280}{n}:pull" for n in range(1000)]
    response = call(service, query=token_query(*scopes), basic=("u" * 60_000, "a guess"))
    assert response.status == 401
    line = service.config.audit_log.read_text()
    assert len(line) < 8192
    record = json.loads(line)
    assert record["user"].startswith("u" * 256) and record["user"].endswith(
        "...[59744 more characters]"
    )
    assert len(record["requested"]) == 11 and record["requested"][-1] == "...[990 more]"
    assert all(len(scope) < 300 for scope in record["requested"])


def test_audit_log_rotates_without_losing_or_mixing_a_line(tmp_path: Path) -> None:
    """Four processes, 500 lines each, a 16 KiB cap: every line is in exactly one file,
    whole, and no file is over the cap."""
    path = tmp_path / "audit" / "audit.log"

    def write(worker: int) -> None:
        log = AuditLog(path, max_bytes=16 * 1024, backups=200)
        for n in range(500):
            log.record(worker=worker, n=n, padding="p" * (n % 50))

    children = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                write(worker)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    files = sorted(path.parent.iterdir())
    assert len(files) > 10
    seen = []
    for file in files:
        assert file.stat().st_size <= 16 * 1024, file
        seen += [json.loads(line) for line in file.read_text().splitlines()]
    assert sorted((r["worker"], r["n"]) for r in seen) == [
        (w, n) for w in range(4) for n in range(500)
    ]


def test_audit_log_keeps_its_generations(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1000, backups=3)
    for n in range(200):
        log.record(n=n)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.log",
        "audit.log.1",
        "audit.log.2",
        "audit.log.3",
    ]
    last = json.loads(path.read_text().splitlines()[-1])
    newest_rotated = json.loads(Path(f"{path}.1").read_text().splitlines()[-1])
    assert last["n"] == 199 and newest_rotated["n"] < 199


def test_real_service_rotates_its_audit_log_and_loses_no_line(tmp_path: Path) -> None:
    """Two gunicorn workers, concurrent clients: each of the 400 requests is one line."""
    config = make_config(tmp_path, audit_log_max_bytes=20_000, audit_log_backups=100)
    populate(config)
    service = AuthServer(config, tmp_path / "auth.json").start()
    try:
        url = f"{service.url}/jwt/auth?service=container_registry&scope=repository:p/q:pull"

        def anonymous(n: int) -> int:
            with urllib.request.urlopen(f"{url}{n}", timeout=30) as response:
                return response.status

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(anonymous, range(400))) == {200}
    finally:
        service.stop()
    files = sorted(tmp_path.glob("audit.log*"))
    assert len(files) > 3
    assert all(file.stat().st_size <= 20_000 for file in files)
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["requested"][0] for r in records) == sorted(
        f"repository:p/q:pull{n}" for n in range(400)
    )
    assert len({r["pid"] for r in records}) == 2


# -- issue 17 defect 5: serving never depends on logging -------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_token_requests_are_answered_on_a_full_log_filesystem(tmp_path: Path) -> None:
    """A real full filesystem: a 64 KiB tmpfs over the audit log's directory, in the
    service's own mount namespace, filled before the service starts."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    config = make_config(tmp_path, audit_log=log_dir / "audit.log")
    populate(config)
    fill = (
        'mount -t tmpfs -o size=64k tmpfs "$0" && '
        '(dd if=/dev/zero of="$0/filler" bs=4k 2>/dev/null; true) && exec "$@"'
    )
    service = AuthServer(config, tmp_path / "auth.json")
    service.prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", fill, str(log_dir)]
    service.start()
    try:
        statuses = [get_token(service.url, "victim", PASSWORD, "198.51.100.1") for _ in range(20)]
        assert statuses == [200] * 20
        log = service.log_path.read_text()
        assert "cannot write" in log and "No space left on device" in log
        assert "Traceback" not in log
        # Free the space inside the service's namespace: writing resumes, the loss is told.
        subprocess.run(
            ["nsenter", "-t", str(service.process.pid), "-m", "rm", f"{log_dir}/filler"],
            check=True,
        )
        assert [get_token(service.url, "victim", PASSWORD, "198.51.100.1") for _ in range(8)] == [
            200
        ] * 8
    finally:
        service.stop()
    assert "works again" in service.log_path.read_text()


def test_token_requests_are_answered_when_the_audit_log_cannot_be_opened(service) -> None:
    service.audit.path.mkdir()  # a directory where the file should be: EISDIR
    query = token_query(SCOPE)
    assert [call(service, query=query, basic=("alice", PASSWORD)).status for _ in range(3)] == [
        200
    ] * 3
    assert service.audit.lost == 3


# -- defect 6: refresh tokens and client ids are bounded --------------------------------
def test_a_long_client_id_is_refused_and_not_stored(service) -> None:
    response = offline_login(service, client_id="c" * 60_000)
    assert response.status == 400
    assert response.message == (
        f"The client_id is 60000 characters long; use at most {MAX_CLIENT_ID}."
    )
    assert offline_login(service, client_id="c" * MAX_CLIENT_ID).status == 200
    with sqlite3.connect(service.config.database) as db:
        assert db.execute("SELECT max(length(client_id)) FROM refresh_tokens").fetchone() == (
            MAX_CLIENT_ID,
        )


def test_300_offline_logins_keep_50_refresh_tokens(service) -> None:
    tokens = [
        offline_login(service, client_id=f"c{n:03d}" + "x" * 190).body["refresh_token"]
        for n in range(300)
    ]
    with sqlite3.connect(service.config.database) as db:
        assert db.execute("SELECT count(*) FROM refresh_tokens").fetchone() == (50,)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = service.config.database.stat().st_size
    assert size < 256 * 1024, size
    assert refresh(service, tokens[-1]).status == 200  # the newest 50 work
    assert refresh(service, tokens[-50]).status == 200
    assert refresh(service, tokens[-51], peer="10.0.0.2").status == 401  # the oldest went


# -- defect 10: a linked auth.db-wal ---------------------------------------------------
@pytest.fixture
def linked_wal(tmp_path: Path) -> Path:
    database = tmp_path / "root/var/opt/appliance/auth/auth.db"
    auth_store.ensure_schema(database)
    if os.geteuid() == 0:  # owned by a service account, as on a real host
        os.chown(database, 65534, 65534)
    target = tmp_path / "precious"
    target.write_text("root's file\n")
    Path(f"{database}-wal").symlink_to(target)
    return database


def test_a_linked_wal_is_one_sentence_from_the_service_start(tmp_path, linked_wal, capsys):
    config = dataclasses.replace(make_config(tmp_path), database=linked_wal)
    config_path = tmp_path / "auth.json"
    config_path.write_text(json.dumps(to_mapping(config)))
    assert server.main(["--config", str(config_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"{linked_wal}-wal is a symbolic link" in error and "remove the link" in error
    with pytest.raises(AuthError, match="is a symbolic link"):
        Store(linked_wal).find_user("root")
    with pytest.raises(AuthError, match="is a symbolic link"):  # what reconfigure reads
        AuthDatabase(linked_wal).current()


def test_a_linked_wal_is_one_sentence_from_appliance_ctl(tmp_path, linked_wal) -> None:
    config = tmp_path / "appliance.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "root": str(tmp_path / "root"),
                "external_url": "https://registry.appliance.test",
                "registry": {"internal_key": pki.generate_private_key("ec-p256").decode()},
            }
        )
    )
    for argv in (["user", "list"], ["project", "create", "team/app"]):
        result = subprocess.run(
            [str(CTL), "-c", str(config), *argv], capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "auth.db-wal is a symbolic link" in result.stderr
    # appliance-ctl (root) gives the database's files back to their owner: never the
    # link's target.
    assert (tmp_path / "precious").read_text() == "root's file\n"
    assert (tmp_path / "precious").stat().st_uid == os.getuid()


def test_reconfigure_gives_the_service_the_log_caps_and_the_limits(tmp_path: Path) -> None:
    """The audit log is rotated with logging.max_bytes / logging.backups, and the three
    rate-limit counters derive from auth.max_failed_logins."""
    from appliance.auth.config import from_mapping
    from recipes.auth import auth_config
    from tests.support.recipes import SECRETS, settings_for

    settings = settings_for(
        tmp_path,
        logging={"max_bytes": 123456, "backups": 4},
        auth={"max_failed_logins": 7},
    )
    config = from_mapping(auth_config(settings, SECRETS).to_mapping())
    assert (config.audit_log_max_bytes, config.audit_log_backups) == (123456, 4)
    assert (
        config.rate_limit_user_failures,
        config.rate_limit_address_failures,
        config.rate_limit_account_failures,
    ) == (7, 21, 70)


def test_a_flood_of_bad_refresh_tokens_writes_little(service) -> None:
    """The measured attack: 100 anonymous refresh-token requests, each asking for ~60 KB
    of scopes, wrote 5.1 MB. Now 95 of them are refused 429 and the log stays small."""
    scopes = " ".join(f"repository:team/{'y' * 50}{n}:pull" for n in range(780))
    form = {"grant_type": "refresh_token", "refresh_token": "guess", "scope": scopes}
    statuses = [call(service, method="POST", form=form, peer="10.6.6.6").status for _ in range(100)]
    assert statuses == [401] * 5 + [429] * 95
    assert service.config.audit_log.stat().st_size < 100 * 2048
