"""Issue 10, the attacks on the edge, performed against a real appliance run as root
(nginx, the registry and the token service under their own accounts, supervisord as
root): each test does what the attacker did and checks that it no longer does harm.

- defect 2: the nginx worker account swaps a temp directory for a symlink, so that the
  root master hands the target over at the next reload;
- defect 3: a service account makes its `log/<service>/current` a symlink, so that
  supervisord (root) appends to another file when it restarts the program;
- defect 4: slow `POST /jwt/auth` bodies tie up the token service's threads;
- defect 7: a local process forges X-Real-IP on the token service's listener;
- defect 8: a client writes its own X-Forwarded-For into the registry's log;
- defect 10: HSTS, a bare /-/health, the debug_addr warning.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from recipes.nginx import wait_reloaded, worker_pids
from tests.support import unix_http
from tests.support.appliance import ApplianceUnderTest, free_port

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the service accounts exist only when run as root"
)

WEB, REGISTRY, AUTH = "appliance-www", "appliance-registry", "appliance-auth"
TOKEN_QUERY = "/jwt/auth?service=container_registry&scope=repository:root/app:pull"


@pytest.fixture(scope="module")
def appliance():
    appliance = ApplianceUnderTest.create(prefix="edge-")
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        appliance.wait_listening()
        yield appliance
    finally:
        appliance.destroy()


def as_account(account: str, code: str) -> list[str]:
    """Run `code` (Python) as `account`; each attempt in it prints its outcome."""
    entry = pwd.getpwnam(account)
    result = subprocess.run(
        ["/usr/bin/python3", "-c", code],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def attempts(*statements: str) -> str:
    """Python that tries each statement and prints `done` or the exception's name."""
    lines = ["import os"]
    for statement in statements:
        lines += [
            "try:",
            f"    {statement}",
            "    print('done')",
            "except OSError as error:",
            "    print(type(error).__name__)",
        ]
    return "\n".join(lines)


def request(
    appliance: ApplianceUnderTest,
    path: str,
    headers: dict[str, str] | None = None,
    base: str | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    url = (base or f"https://{appliance.registry_address}") + path
    context = (
        ssl.create_default_context(cafile=str(appliance.certificate))
        if url.startswith("https:")
        else None
    )
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), context=context, timeout=timeout
        ) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def basic(appliance: ApplianceUnderTest) -> dict[str, str]:
    encoded = base64.b64encode(f"root:{appliance.password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def audit_records(appliance: ApplianceUnderTest) -> list[dict]:
    log = appliance.root / "var/log/appliance/audit/audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()]


def hup_nginx(appliance: ApplianceUnderTest) -> None:
    """Reload nginx and wait until the master has re-read its config (and re-created
    its temp paths) and the old workers stopped serving."""
    old = worker_pids(appliance.pids()["nginx"])
    appliance.ctl("hup", "nginx")
    deadline = time.monotonic() + 10
    while set(worker_pids(appliance.pids()["nginx"])) & set(old) == set(old):
        assert time.monotonic() < deadline, "nginx started no new workers after HUP"
        time.sleep(0.05)
    wait_reloaded(old)


# -- defect 2: nginx's temp directories ------------------------------------------------
def test_the_worker_account_cannot_have_the_master_chown_a_directory(appliance, tmp_path):
    temp = appliance.root / "var/opt/appliance/nginx/temp"
    target = tmp_path / "cron.d"  # stands for /etc/cron.d
    target.mkdir()
    web_uid = pwd.getpwnam(WEB).pw_uid
    assert sorted(p.name for p in temp.iterdir()) == ["body", "fastcgi", "proxy", "scgi", "uwsgi"]
    assert (temp.stat().st_uid, temp.stat().st_mode & 0o7777) == (0, 0o755)
    assert all((temp / name).stat().st_uid == web_uid for name in ("body", "proxy"))

    scgi = temp / "scgi"
    outcomes = as_account(
        WEB,
        attempts(
            f"os.rmdir({str(scgi)!r})",
            f"os.rename({str(scgi)!r}, {str(scgi) + '.old'!r})",
            f"os.symlink({str(target)!r}, {str(temp / 'new')!r})",
        ),
    )
    assert outcomes == ["PermissionError"] * 3
    hup_nginx(appliance)

    assert target.stat().st_uid == 0
    assert scgi.is_dir() and not scgi.is_symlink()


# -- defect 3: supervisord's log files --------------------------------------------------
def test_a_service_account_cannot_redirect_supervisords_log_writes(appliance, tmp_path):
    victim = tmp_path / "victim"  # stands for any root-owned file
    victim.write_text("root's own line\n")
    logs = appliance.root / "var/log/appliance"
    adm = grp.getgrnam("adm").gr_gid
    for service, account in (("registry", REGISTRY), ("auth", AUTH), ("nginx", WEB)):
        directory = logs / service
        status = directory.stat()
        assert (status.st_uid, status.st_gid, status.st_mode & 0o7777) == (0, adm, 0o750)
        current = directory / "current"
        outcomes = as_account(
            account,
            attempts(
                f"os.unlink({str(current)!r})",
                f"os.symlink({str(victim)!r}, {str(directory / 'next')!r})",
                f"os.rename({str(directory / 'next')!r}, {str(current)!r})",
            ),
        )
        assert outcomes == ["PermissionError"] * 3, service

    before = appliance.pids()["registry"]
    # A cold restart (restart alone is the graceful handover inside the same program):
    # supervisord opens the log by its path again.
    appliance.ctl("stop", "registry")
    appliance.ctl("start", "registry")
    assert appliance.wait_until_running()["registry"] != before
    appliance.wait_listening()
    request(appliance, "/v2/")  # the registry writes to its log

    # The line passes through the registry's wrapper and supervisord on its way.
    deadline = time.monotonic() + 10
    while '"GET /v2/ HTTP/1.1" 401' not in (logs / "registry/current").read_text():
        assert time.monotonic() < deadline, "the request never reached the registry's log"
        time.sleep(0.1)
    assert victim.read_text() == "root's own line\n"
    assert not (logs / "registry/current").is_symlink()


def test_the_audit_log_has_a_directory_of_the_auth_account(appliance):
    audit = appliance.root / "var/log/appliance/audit"
    assert audit.stat().st_uid == pwd.getpwnam(AUTH).pw_uid
    assert audit.stat().st_gid == grp.getgrnam("adm").gr_gid
    status, _, _ = request(appliance, TOKEN_QUERY, basic(appliance))
    assert status == 200
    assert audit_records(appliance)[-1]["user"] == "root"
    assert not (appliance.root / "var/log/appliance/auth/audit.log").exists()


# -- defect 4: slow bodies ----------------------------------------------------------------
def test_slow_token_request_bodies_do_not_stall_sign_ins(appliance):
    """Twelve clients each trickle a POST /jwt/auth body a byte a second: more than the
    token service's threads (2 workers x 4). Sign-ins meanwhile answer at once."""
    port = int(appliance.registry_address.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    stop = threading.Event()
    opened = []

    def trickle() -> None:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
            context.wrap_socket(raw, server_hostname=appliance.host) as tls,
        ):
            tls.sendall(
                b"POST /jwt/auth HTTP/1.1\r\nHost: "
                + appliance.registry_address.encode()
                + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 1000\r\n\r\n"
            )
            opened.append(tls)
            while not stop.wait(1):
                tls.sendall(b"a")

    senders = [threading.Thread(target=trickle, daemon=True) for _ in range(12)]
    for sender in senders:
        sender.start()
    try:
        deadline = time.monotonic() + 10
        while len(opened) < len(senders):
            assert time.monotonic() < deadline, "the slow clients could not connect"
            time.sleep(0.05)
        time.sleep(2)  # every slow body has reached nginx (and, unbuffered, the service)
        for _ in range(6):
            started = time.monotonic()
            status, _, body = request(appliance, TOKEN_QUERY, basic(appliance), timeout=5)
            elapsed = time.monotonic() - started
            assert status == 200 and json.loads(body)["token"]
            assert elapsed < 2, f"a sign-in took {elapsed:.1f} s behind the slow bodies"
        assert all(sender.is_alive() for sender in senders), "a slow client was cut off early"
    finally:
        stop.set()
        for sender in senders:
            sender.join(5)


def test_token_request_bodies_are_capped_and_blob_uploads_are_not(appliance):
    port = appliance.registry_address
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    too_big = urllib.request.Request(
        f"https://{port}/jwt/auth",
        data=b"a" * (65 * 1024),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(too_big, context=context, timeout=30)
    assert refused.value.code == 413
    # The same size to /v2/ reaches the registry, which asks for a token (401), not 413.
    blob = urllib.request.Request(
        f"https://{port}/v2/root/app/blobs/uploads/", data=b"a" * (65 * 1024), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as unauthorized:
        urllib.request.urlopen(blob, context=context, timeout=30)
    assert unauthorized.value.code == 401


# -- defect 7: X-Real-IP --------------------------------------------------------------
def test_no_local_account_but_nginx_reaches_the_token_service(appliance):
    path = appliance.auth_internal_address
    directory = Path(path).parent
    status = directory.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o7777) == (
        pwd.getpwnam(AUTH).pw_uid,
        grp.getgrnam(WEB).gr_gid,
        0o2750,
    )
    connect = (
        f"import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({path!r})\n"
        f"    print('connected')\nexcept OSError as error:\n"
        f"    print(type(error).__name__)"
    )
    assert as_account("nobody", connect) == ["PermissionError"]
    assert as_account(REGISTRY, connect) == ["PermissionError"]
    assert as_account(WEB, connect) == ["connected"]
    # Through nginx, the address nginx saw, whatever the client claims.
    status, _, _ = request(
        appliance,
        TOKEN_QUERY,
        basic(appliance) | {"X-Real-IP": "203.0.113.7", "X-Forwarded-For": "203.0.113.7"},
    )
    assert status == 200
    assert audit_records(appliance)[-1]["client"] == "127.0.0.1"
    assert unix_http.get(path, "/-/health")[0] == 200


# -- defect 8: X-Forwarded-For --------------------------------------------------------
def test_a_client_cannot_write_its_own_address_into_the_registry_log(appliance):
    agent = f"edge-test-{time.monotonic_ns()}"
    status, _, _ = request(appliance, "/v2/", {"X-Forwarded-For": "6.6.6.6", "User-Agent": agent})
    assert status == 401
    log = appliance.root / "var/log/appliance/registry/current"
    deadline = time.monotonic() + 10
    while agent not in log.read_text():
        assert time.monotonic() < deadline, "the registry did not log the request"
        time.sleep(0.1)
    lines = [x for x in log.read_text().splitlines() if agent in x]
    assert not [x for x in lines if "6.6.6.6" in x]
    assert [x for x in lines if "http.request.remoteaddr=127.0.0.1 " in x]


# -- defect 10 ------------------------------------------------------------------------
def test_hsts_and_a_bare_health_answer_through_nginx(appliance):
    for path in ("/v2/", TOKEN_QUERY, "/-/health", "/nothing-here"):
        _, headers, _ = request(appliance, path)
        assert headers.get("Strict-Transport-Security") == "max-age=63072000", path
    status, _, body = request(appliance, "/-/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_reconfigure_warns_of_a_debug_server_off_loopback(appliance):
    # A dry run: the test binds nothing outside loopback.
    debug = f"0.0.0.0:{free_port()}"
    appliance.write_config({"registry": {"debug_addr": debug}})
    try:
        warned = appliance.reconfigure("--dry-run").stdout
    finally:
        appliance.write_config({"registry": {"debug_addr": None}})
    assert f"Warning: registry.debug_addr {debug} is not a loopback address" in warned
    assert "/debug/pprof/" in warned
    assert "Warning" not in appliance.reconfigure("--dry-run").stdout


# Last: it moves the token service to TCP for the rest of the module.
def test_over_tcp_the_token_service_believes_no_forwarded_address(appliance):
    appliance.write_config({"auth": {"listen_network": "tcp"}})
    appliance.reconfigure()
    appliance.wait_listening()
    address = appliance.config["auth"]["listen_addr"]
    status, _, _ = request(
        appliance,
        TOKEN_QUERY,
        basic(appliance) | {"X-Real-IP": "198.51.100.9"},
        base=f"http://{address}",
    )
    assert status == 200
    assert audit_records(appliance)[-1]["client"] == "127.0.0.1"
    # nginx still reaches it there.
    status, _, _ = request(appliance, TOKEN_QUERY, basic(appliance))
    assert status == 200
    assert not Path(appliance.root / "var/opt/appliance/auth-socket/auth.sock").exists()
