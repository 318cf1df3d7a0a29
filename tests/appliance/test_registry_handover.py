"""Zero failed requests on any change: a counting client (token requests, pushes and
pulls in a loop through nginx TLS) runs across each kind of change, with a large
upload and a large download in flight across the registry's handovers.

The registry cannot reload, so its wrapper (appliance/programs/registry.py) hands it
over to a new process; the auth service reloads gracefully on HUP. Also here: whatever
the registry prints reaches its log with every configured secret masked.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.appliance import ApplianceUnderTest, free_port
from tests.support.counting_client import CountingClient, Registry

HOOK_SECRET = "hook-secret-" + os.urandom(8).hex()
BIG = 32 * 1024 * 1024
PIECE = 256 * 1024
PIECE_PAUSE = 0.04  # ~5 s for a big transfer: it spans the handover


@pytest.fixture(scope="module")
def appliance() -> Iterator[ApplianceUnderTest]:
    appliance = ApplianceUnderTest.create(
        extra={
            "registry": {
                "notifications": [
                    {
                        "name": "hook",
                        "url": f"http://127.0.0.1:{free_port()}/events",
                        "headers": {"Authorization": [f"Bearer {HOOK_SECRET}"]},
                    }
                ]
            }
        },
        prefix="ho-",
    )
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        yield appliance
    finally:
        appliance.destroy()


def slow_upload(registry: Registry, repository: str, data: bytes) -> tuple[int, str]:
    """A blob pushed in one PATCH that takes seconds; the final PUT's status and digest."""
    conn = registry.connection(timeout=120)
    token = registry.token(registry.client(), repository)
    auth = {"Authorization": f"Bearer {token}"}
    conn.request("POST", f"/v2/{repository}/blobs/uploads/", headers=auth)
    reply = conn.getresponse()
    reply.read()
    location = reply.getheader("Location")

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(data), PIECE):
            time.sleep(PIECE_PAUSE)
            yield data[start : start + PIECE]

    path = location[location.index("/v2/") :]
    conn.request(
        "PATCH",
        path,
        body=pieces(),
        encode_chunked=True,
        headers={**auth, "Content-Type": "application/octet-stream"},
    )
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 202, f"PATCH answered {reply.status}"
    location = reply.getheader("Location")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = location[location.index("/v2/") :]
    conn.request("PUT", f"{path}{'&' if '?' in path else '?'}digest={digest}", headers=auth)
    reply = conn.getresponse()
    reply.read()
    return reply.status, digest


def slow_download(registry: Registry, repository: str, digest: str) -> bytes:
    conn = registry.connection(timeout=120)
    token = registry.token(registry.client(), repository)
    conn.request(
        "GET", f"/v2/{repository}/blobs/{digest}", headers={"Authorization": f"Bearer {token}"}
    )
    reply = conn.getresponse()
    assert reply.status == 200, reply.status
    data = b""
    while chunk := reply.read(PIECE):
        data += chunk
        time.sleep(PIECE_PAUSE)
    return data


def in_background(work: Callable[[], object]) -> Callable[[], object]:
    """Run `work` on a thread; the returned call joins it and gives its result."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(work())
        except (OSError, http.client.HTTPException, AssertionError) as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> object:
        thread.join(180)
        assert outcome, "the transfer did not finish"
        return outcome[0]

    return result


def across(
    appliance: ApplianceUnderTest, change: Callable[[], None], transfers: bool = False
) -> CountingClient:
    """The counting client (and, for the registry, a large upload and download in
    flight) running across `change`; asserts the transfers completed intact."""
    registry = Registry(appliance)
    if transfers:
        big = os.urandom(BIG)
        conn = registry.client()
        stored = registry.push_blob(conn, registry.token(conn, "root/big"), "root/big", big)
        upload = in_background(lambda: slow_upload(registry, "root/big", os.urandom(BIG)))
        download = in_background(lambda: slow_download(registry, "root/big", stored))
    client = CountingClient(appliance).start()
    time.sleep(1.5)
    change()
    time.sleep(1.5)
    client.stop()
    if transfers:
        status, digest = upload()
        assert status == 201, f"the upload in flight ended with {status}"
        assert registry_blob_digest(registry, digest) == digest  # it pulls identical
        assert download() == big, "the download in flight was cut short or altered"
    assert client.done > 50, f"only {client.done} requests: the client barely ran"
    return client


def registry_blob_digest(registry: Registry, digest: str) -> str:
    conn = registry.client()
    token = registry.token(conn, "root/big")
    reply = conn.request(
        "GET", f"/v2/root/big/blobs/{digest}", headers={"Authorization": f"Bearer {token}"}
    )
    return "sha256:" + hashlib.sha256(reply.read()).hexdigest()


def token_lifetime(appliance: ApplianceUnderTest) -> int:
    registry = Registry(appliance)
    reply = registry.client().request(
        "GET", registry.token_path("root/x"), headers=registry.basic()
    )
    return json.loads(reply.read())["expires_in"]


def test_an_auth_setting_change_is_a_reload_that_fails_no_request(appliance):
    lifetime = token_lifetime(appliance) + 60
    auth_pid = appliance.pids()["auth"]
    outputs = []

    def change() -> None:
        appliance.write_config({"auth": {"token_lifetime": lifetime}})
        outputs.append(appliance.reconfigure().stdout)

    client = across(appliance, change)
    assert client.failures == [], client.failures
    assert "+ service auth (reloaded)" in outputs[0]
    assert token_lifetime(appliance) == lifetime  # the new workers run the new config
    assert appliance.pids()["auth"] == auth_pid


def test_a_registry_setting_change_is_a_handover_that_fails_no_request(appliance):
    registry_pid = appliance.pids()["registry"]
    outputs = []

    def change() -> None:
        appliance.write_config({"registry": {"log_level": "debug"}})
        outputs.append(appliance.reconfigure().stdout)

    client = across(appliance, change, transfers=True)
    assert client.failures == [], client.failures
    assert "+ service registry (reloaded)" in outputs[0]
    assert appliance.pids()["registry"] == registry_pid  # the program was not restarted
    log = (appliance.root / "var/log/appliance/registry/current").read_text()
    assert "level=debug" in log  # the new process runs the new config


def test_a_registry_env_change_is_a_handover_that_fails_no_request(appliance):
    registry_pid = appliance.pids()["registry"]
    marker = "handover-" + os.urandom(4).hex()

    def change() -> None:
        appliance.write_config({"registry": {"env": {"REGISTRY_LOG_FIELDS_MARK": marker}}})
        appliance.reconfigure()

    client = across(appliance, change)
    assert client.failures == [], client.failures
    assert appliance.pids()["registry"] == registry_pid
    log = (appliance.root / "var/log/appliance/registry/current").read_text()
    assert f"mark={marker}" in log


def test_a_new_registry_address_is_a_handover_that_fails_no_request(appliance):
    address = f"127.0.0.1:{free_port()}"
    outputs = []

    def change() -> None:
        appliance.write_config({"registry": {"http_addr": address}})
        outputs.append(appliance.reconfigure().stdout)

    client = across(appliance, change)
    assert client.failures == [], client.failures
    assert "+ service registry (reloaded)" in outputs[0]
    assert "+ service nginx (reloaded)" in outputs[0]
    appliance.wait_listening()  # the registry answers on its new address


def test_restart_registry_is_a_handover_that_fails_no_request(appliance):
    def change() -> None:
        result = appliance.ctl("restart", "registry")
        assert "ok: restart registry" in result.stdout

    client = across(appliance, change, transfers=True)
    assert client.failures == [], client.failures


def test_restart_auth_is_a_reload_that_fails_no_request(appliance):
    client = across(appliance, lambda: appliance.ctl("restart", "auth"))
    assert client.failures == [], client.failures


def test_hup_nginx_fails_no_request(appliance):
    client = across(appliance, lambda: appliance.ctl("hup", "nginx"))
    assert client.failures == [], client.failures


def test_the_registry_log_masks_the_notification_authorization(appliance):
    # Distribution logs every notification endpoint with its headers at start; the
    # wrapper's filter masks the header value, the endpoint itself is still logged.
    appliance.ctl("restart", "registry")
    log = (appliance.root / "var/log/appliance/registry/current").read_text()
    [line, *_] = [x for x in log.splitlines() if "configuring endpoint hook" in x]
    assert "Authorization:[********]" in line, line
    assert HOOK_SECRET not in log
    tail = appliance.ctl("tail", "registry", "--no-follow").stdout
    assert "hook" in tail and HOOK_SECRET not in tail


def registry_processes(appliance: ApplianceUnderTest) -> dict[int, int]:
    """pid -> parent pid of every docker-registry serving this appliance's config."""
    config = str(appliance.root / "var/opt/appliance/registry/config.yml").encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        if config in cmdline and cmdline[0].endswith((b"docker-registry", b"/registry")):
            found[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_no_registry_outlives_its_wrapper(appliance):
    # kill -9 of the wrapper (the OOM killer): its child is told to stop with it, and
    # supervisord's new wrapper runs the only registry left.
    # (A standby left by an earlier handover retires within seconds.)
    assert wait_for(lambda: len(registry_processes(appliance)) == 1), registry_processes(appliance)
    old = registry_processes(appliance)
    wrapper = appliance.kill_and_wait_back("registry")
    assert wait_for(lambda: set(registry_processes(appliance).values()) == {wrapper}), (
        registry_processes(appliance)
    )
    assert not set(old) & set(registry_processes(appliance))
    # A stop is forwarded: the registry stops with its wrapper.
    appliance.ctl("stop", "registry")
    assert wait_for(lambda: not registry_processes(appliance)), registry_processes(appliance)
    appliance.ctl("start", "registry")
    appliance.wait_until_running()


def test_on_a_unix_socket_a_registry_change_is_a_handover_that_fails_no_request():
    appliance = ApplianceUnderTest.create(
        extra={"registry": {"listen_network": "unix"}}, prefix="ho-"
    )
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        registry_pid = appliance.pids()["registry"]

        def change() -> None:
            appliance.write_config({"registry": {"log_level": "debug"}})
            assert "+ service registry (reloaded)" in appliance.reconfigure().stdout

        client = across(appliance, change, transfers=True)
        assert client.failures == [], client.failures
        assert appliance.pids()["registry"] == registry_pid
        socket = appliance.root / "var/opt/appliance/registry-socket/registry.sock"
        assert socket.is_socket()  # back on its own socket
    finally:
        appliance.destroy()


def test_a_registry_that_cannot_start_on_the_change_fails_the_run_and_keeps_serving(appliance):
    # Distribution refuses an unknown log level at start: the new registry exits, the
    # running one is kept, and reconfigure says so in one sentence.
    serving = appliance.registry_process()
    appliance.write_config({"registry": {"env": {"REGISTRY_LOG_LEVEL": "chatty"}}})
    try:
        result = appliance.reconfigure(check=False)
        assert result.returncode != 0
        assert "the registry kept its running configuration" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert appliance.registry_process() == serving
        assert across(appliance, lambda: None).failures == []  # still serving
    finally:
        appliance.config["registry"].pop("env")  # (write_config merges: {} would keep it)
        appliance.write_config()
        appliance.reconfigure()
