"""`appliance-ctl rotate-token-key` on a running appliance: a token signed by the old key
before the rotation keeps pulling and pushing across it, a counting client (new tokens,
pushes, pulls through nginx TLS) sees 0 failures, new tokens carry the new key's kid,
and once the rotation is finished (--finish, or the first reconfigure after the old
key's time) the old token is refused and only the new key verifies.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509

from appliance.auth.tokens import libtrust_key_id
from tests.support.appliance import ApplianceUnderTest
from tests.support.counting_client import MANIFEST_TYPE, CountingClient, Registry

REPOSITORY = "root/rotation"


@pytest.fixture(scope="module")
def appliance() -> Iterator[ApplianceUnderTest]:
    appliance = ApplianceUnderTest.create(prefix="rot-")
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        yield appliance
    finally:
        appliance.destroy()


def secrets_file(appliance: ApplianceUnderTest) -> Path:
    return appliance.root / "etc/appliance/appliance-secrets.json"


def bundle_kids(appliance: ApplianceUnderTest) -> list[str]:
    """The key IDs of the certificates the registry trusts, in the bundle's order."""
    bundle = (appliance.root / "var/opt/appliance/registry/token-bundle.crt").read_bytes()
    return [libtrust_key_id(c.public_key()) for c in x509.load_pem_x509_certificates(bundle)]


def kid(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def fresh_kid(appliance: ApplianceUnderTest, expected: str, timeout: float = 15) -> str:
    """The kid of new tokens once the auth service's old workers (which may still sign
    with the old key for a moment after its graceful reload) are gone."""
    registry = Registry(appliance)
    deadline = time.monotonic() + timeout
    while True:
        seen = kid(registry.token(registry.client(), REPOSITORY))
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


class HeldTokenLoop:
    """Pushes and pulls with one token obtained before the change, until stopped."""

    def __init__(self, appliance: ApplianceUnderTest, token: str) -> None:
        self.registry, self.token = Registry(appliance), token
        self.done, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> HeldTokenLoop:
        self._thread.start()
        return self

    def stop(self) -> HeldTokenLoop:
        self._stop.set()
        self._thread.join(60)
        return self

    def _loop(self) -> None:
        conn = self.registry.client()
        while not self._stop.is_set():
            try:
                self.once(conn)
                self.done += 1
            except (OSError, AssertionError) as error:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {error!r}")
                conn.reset()

    def once(self, conn=None) -> None:  # noqa: ANN001 - a counting_client.Connection
        conn = conn or self.registry.client()
        layer = os.urandom(16 * 1024)
        self.registry.push_image(conn, self.token, REPOSITORY, "held", layer)
        if self.registry.pull_image(conn, self.token, REPOSITORY, "held") != layer:
            raise AssertionError("pulled another layer than pushed")


def across(appliance: ApplianceUnderTest, held_token: str, *args: str):
    """`appliance-ctl ARGS` with the counting client and the held-token loop running."""
    held = HeldTokenLoop(appliance, held_token).start()
    client = CountingClient(appliance).start()
    time.sleep(1.5)
    result = appliance.ctl(*args)
    time.sleep(1.5)
    client.stop()
    held.stop()
    assert client.done > 30, f"only {client.done} requests: the client barely ran"
    assert held.done > 3, f"only {held.done} pushes with the held token"
    return result, client, held


@pytest.fixture(scope="module")
def old_token(appliance) -> str:
    """A token the key of the first reconfigure signed, obtained before any rotation and
    valid for auth.token_lifetime (300 s): both tests run well within it."""
    registry = Registry(appliance)
    return registry.token(registry.client(), REPOSITORY)


def manifest_status(appliance: ApplianceUnderTest, token: str) -> int:
    conn = Registry(appliance).client()
    reply = conn.request(
        "GET",
        f"/v2/{REPOSITORY}/manifests/held",
        headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPE},
    )
    reply.read()
    return reply.status


def test_rotation_fails_no_request_and_the_old_token_works_on(appliance, old_token):
    old_kid = kid(old_token)
    assert bundle_kids(appliance) == [old_kid]
    registry_pid = appliance.pids()["registry"]

    result, client, held = across(appliance, old_token, "rotate-token-key")

    assert client.failures == [], client.failures
    assert held.failures == [], held.failures
    out = result.stdout
    # The registry trusts the new key (handed over) before the auth service signs with it.
    assert out.index("+ service registry (reloaded)") < out.index("+ service auth (reloaded)")
    [until] = [line for line in out.splitlines() if "stays trusted until" in line]
    assert until.startswith("The old key stays trusted until ") and " UTC (" in until
    assert until.endswith(
        "any reconfigure after that removes it (or appliance-ctl rotate-token-key --finish)."
    )
    assert appliance.pids()["registry"] == registry_pid  # a handover, not a restart
    # Neither key reaches the output or the run's log.
    logs = appliance.root / "var/log/appliance/rotate-token-key"
    for text in [out, result.stderr, *(f.read_text() for f in logs.iterdir())]:
        assert "PRIVATE KEY" not in text
    assert "Resumed" not in out

    new_kid = bundle_kids(appliance)[1]
    assert bundle_kids(appliance) == [old_kid, new_kid] and new_kid != old_kid
    assert f"The token service signs with the new key {new_kid}." in out
    assert fresh_kid(appliance, new_kid) == new_kid
    HeldTokenLoop(appliance, old_token).once()  # the old token still pushes and pulls

    # A plain reconfigure changes nothing (the secrets file least of all).
    secrets_before = secrets_file(appliance).read_bytes()
    again = appliance.reconfigure().stdout
    assert "reconfigure: 0/" in again, again
    assert secrets_file(appliance).read_bytes() == secrets_before

    # Another rotation while the old key is still trusted: refused, nothing changed.
    refused = appliance.ctl("rotate-token-key", check=False)
    assert refused.returncode == 2, refused
    assert "the last rotation is not finished" in refused.stderr
    assert "rotate-token-key --finish --force" in refused.stderr
    assert secrets_file(appliance).read_bytes() == secrets_before


def test_finish_refuses_early_then_forced_only_the_new_key_verifies(appliance, old_token):
    old_kid, new_kid = bundle_kids(appliance)  # as the rotation left them
    assert kid(old_token) == old_kid
    assert manifest_status(appliance, old_token) == 200
    secrets_before = secrets_file(appliance).read_bytes()

    early = appliance.ctl("rotate-token-key", "--finish", check=False)
    assert early.returncode == 2, early
    assert "The previous signing key stays trusted until " in early.stderr
    assert "add --force to refuse them now" in early.stderr
    assert secrets_file(appliance).read_bytes() == secrets_before

    registry = Registry(appliance)
    new_token = registry.token(registry.client(), REPOSITORY)
    assert kid(new_token) == new_kid
    result, client, held = across(appliance, new_token, "rotate-token-key", "--finish", "--force")

    assert client.failures == [], client.failures
    assert held.failures == [], held.failures
    assert "+ service registry (reloaded)" in result.stdout
    assert f"The old key {old_kid} is no longer trusted" in result.stdout
    assert bundle_kids(appliance) == [new_kid]
    assert manifest_status(appliance, old_token) == 401  # unexpired, but its key is gone
    assert manifest_status(appliance, new_token) == 200
    assert "previous_token_signing" not in secrets_file(appliance).read_text()
    assert "reconfigure: 0/" in appliance.reconfigure().stdout


def test_the_first_reconfigure_after_the_old_keys_time_drops_it(appliance):
    first_kid = bundle_kids(appliance)[0]
    appliance.ctl("rotate-token-key")
    assert bundle_kids(appliance)[0] == first_kid and len(bundle_kids(appliance)) == 2
    # Time passes (the drop time, moved into the past, stands for it).
    path = secrets_file(appliance)
    stored = json.loads(path.read_text())
    stored["previous_token_signing_trusted_until"] = "2020-01-01T00:00:00Z"
    path.write_text(json.dumps(stored))

    out = appliance.reconfigure().stdout
    assert "+ service registry (reloaded)" in out
    [second_kid] = bundle_kids(appliance)
    assert second_kid != first_kid
    assert "previous_token_signing" not in path.read_text()
    assert "reconfigure: 0/" in appliance.reconfigure().stdout


def test_an_interrupted_rotation_is_kept_by_reconfigure_and_resumed(appliance):
    [signing_kid] = bundle_kids(appliance)
    # Killed between the two steps: the registry trusts both keys, the old one signs.
    killed = subprocess_env_run(appliance, "after-notifications", "rotate-token-key")
    assert killed.returncode != 0
    stored = json.loads(secrets_file(appliance).read_text())
    assert stored["next_token_signing_key"]
    next_kid = bundle_kids(appliance)[1]
    assert bundle_kids(appliance) == [signing_kid, next_kid]

    assert "reconfigure: 0/" in appliance.reconfigure().stdout  # kept as it is
    assert fresh_kid(appliance, signing_kid) == signing_kid

    resumed = appliance.ctl("rotate-token-key").stdout
    assert "Resumed the rotation begun earlier (same new key)." in resumed
    assert f"The token service signs with the new key {next_kid}." in resumed
    assert fresh_kid(appliance, next_kid) == next_kid
    assert bundle_kids(appliance) == [signing_kid, next_kid]
    appliance.ctl("rotate-token-key", "--finish", "--force")


def subprocess_env_run(appliance: ApplianceUnderTest, crash_at: str, *args: str):
    import subprocess

    from tests.support.appliance import BIN

    return subprocess.run(
        [str(BIN / "appliance-ctl"), "-c", str(appliance.config_file), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "APPLIANCE_TEST_CRASH_AT": crash_at},
    )
