"""The verified-credentials cache: it spares the hash, stays bounded, and a password
change, block or token revocation made by one process is honoured by another at once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from appliance.auth import credentials
from appliance.auth.app import TokenService
from appliance.auth.signin import CredentialCache
from appliance.auth.store import Store
from tests.support.auth_requests import call, token_query
from tests.support.auth_server import make_config

OLD, NEW = "old password 1", "new password 2"
QUERY = token_query("repository:team/app:pull")


def _worker(config, connection) -> None:
    """A separate process with its own TokenService, like one gunicorn worker."""
    service = TokenService(config)
    while True:
        request = connection.recv()
        if request is None:
            return
        started = time.perf_counter()
        response = call(service, query=QUERY, basic=request)
        connection.send((response.status, time.perf_counter() - started))


@pytest.fixture
def two_workers(tmp_path: Path, auth_database):
    """Two processes on one database: two workers of a node, or (PostgreSQL) two nodes."""
    config = make_config(tmp_path, credential_cache_ttl=300, database=auth_database)
    store = Store(config.database)
    store.create_user("alice", credentials.hash_password(OLD))  # production argon2 cost
    store.create_project("team/app", "private", True)
    store.add_member("team/app", "alice", "reporter")
    context = multiprocessing.get_context("fork")
    workers = []
    for _ in range(2):
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(config, child), daemon=True)
        process.start()
        workers.append((process, parent))

    def ask(index: int, user: str, password: str) -> tuple[int, float]:
        workers[index][1].send((user, password))
        return workers[index][1].recv()

    yield store, ask
    for process, parent in workers:
        parent.send(None)
        process.join(timeout=5)


def test_cache_hits_skip_the_hash(two_workers) -> None:
    _, ask = two_workers
    status, cold = ask(0, "alice", OLD)
    assert status == 200
    warm = min(ask(0, "alice", OLD)[1] for _ in range(5))
    assert warm < cold / 5, (cold, warm)  # argon2id (~0.1 s) is skipped


@pytest.mark.parametrize("change", ["password", "block"])
def test_change_in_one_process_reaches_the_other_at_once(two_workers, change) -> None:
    store, ask = two_workers
    assert ask(0, "alice", OLD)[0] == 200
    assert ask(1, "alice", OLD)[0] == 200  # both workers now hold OLD in their cache
    if change == "password":
        store.set_password_hash("alice", credentials.hash_password(NEW))
        assert ask(0, "alice", OLD)[0] == 401
        assert ask(1, "alice", OLD)[0] == 401
        assert ask(1, "alice", NEW)[0] == 200
    else:
        store.set_blocked("alice", True)
        assert ask(0, "alice", OLD)[0] == 401
        assert ask(1, "alice", OLD)[0] == 401
        store.set_blocked("alice", False)
        assert ask(0, "alice", OLD)[0] == 200


def test_revoked_token_is_refused_by_another_process_at_once(two_workers) -> None:
    store, ask = two_workers
    token, secret = store.create_personal_access_token("alice", "ci", ["read_registry"], None)
    assert ask(0, "alice", secret)[0] == 200
    assert ask(1, "alice", secret)[0] == 200
    store.revoke_personal_access_token("alice", token.id)
    assert ask(0, "alice", secret)[0] == 401
    assert ask(1, "alice", secret)[0] == 401


def test_cache_is_bounded_and_short_lived() -> None:
    cache = CredentialCache(ttl=60, size=3)
    digests = [cache.digest(f"user{i}", "pw") for i in range(4)]
    for i, digest in enumerate(digests):
        cache.remember(digest, user_id=i, version=1, now=1000)
    assert not cache.holds(digests[0], 0, 1, now=1001)  # least recently used, dropped
    assert all(cache.holds(d, i, 1, now=1001) for i, d in enumerate(digests) if i)
    assert not cache.holds(digests[1], 1, 1, now=1061)  # expired
    assert not cache.holds(digests[2], 2, 2, now=1001)  # credentials version moved on


def test_cache_keys_are_not_the_password() -> None:
    cache = CredentialCache(ttl=60, size=3)
    assert b"secret-pw" not in cache.digest("alice", "secret-pw")
    assert cache.digest("alice", "pw") != cache.digest("alice", "pw2")
    assert cache.digest("alice", "pw") != CredentialCache(60, 3).digest("alice", "pw")
