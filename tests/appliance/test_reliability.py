"""Faults against the real appliance: a reconfigure killed mid-run, a supervisord killed
outright, a port taken by a stranger, a root its service accounts cannot enter.

Each test performs the fault as an admin's host would meet it (kill -9 of the process,
SIGHUP of a dropped SSH session, another program on the port) and then checks what the
admin would check: the new settings are live, every service runs and answers, nothing of
the root is left behind.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from appliance import procfs
from tests.support.appliance import BIN, ApplianceUnderTest, free_port

SUPERVISOR = "var/opt/appliance/supervisor"


@pytest.fixture(scope="module")
def appliance() -> ApplianceUnderTest:
    appliance = ApplianceUnderTest.create()
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        yield appliance
    finally:
        appliance.destroy()


def reconfigure_crashing_at(appliance: ApplianceUnderTest, point: str) -> int:
    environment = dict(os.environ, APPLIANCE_TEST_CRASH_AT=point)
    result = subprocess.run(
        [str(BIN / "appliance-ctl"), "-c", str(appliance.config_file), "reconfigure"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    return result.returncode


def token_lifetime(appliance: ApplianceUnderTest) -> int:
    payload = appliance.token("repository:root/x:pull").split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims["exp"] - claims["iat"]


def http_status(port: int, path: str) -> int:
    """The status of GET path on 127.0.0.1:port, redirects not followed."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def supervisord_pid(appliance: ApplianceUnderTest) -> int:
    return int((appliance.root / SUPERVISOR / "supervisord.pid").read_text())


def processes_of(root: Path) -> list[str]:
    """Every process whose command line or environment names this root."""
    found = []
    for pid in procfs.all_pids():
        if pid == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        marker = procfs.environment(pid).get("APPLIANCE_SUPERVISOR", "")
        if str(root) in cmdline or marker.startswith(str(root)):
            found.append(f"{pid} {cmdline}")
    return found


@pytest.mark.parametrize(
    "point", ["after-files", "mid-reload", "after-notifications", "after-files:HUP"]
)
def test_a_killed_reconfigure_is_completed_by_the_next_one(appliance, point):
    """kill -9 after the files are written, halfway through a reload (the registry's
    handover signalled, not yet waited for), or after the notifications: the next run
    still reloads what the new files need. A SIGHUP (the admin's SSH session dropped) does
    not stop the run at all."""
    debug, http = free_port(), free_port()
    lifetime = 300 + int(time.time()) % 500
    appliance.write_config(
        {
            "registry": {"debug_addr": f"127.0.0.1:{debug}"},
            "nginx": {"http_port": http},
            "auth": {"token_lifetime": lifetime},
        }
    )
    returncode = reconfigure_crashing_at(appliance, point)
    if point.endswith(":HUP"):
        assert returncode == 0  # the hangup is ignored, the run goes to its end
    else:
        assert returncode == -signal.SIGKILL
        again = appliance.reconfigure()
        if point != "after-notifications":
            assert "left pending by an interrupted run" in again.stdout
    appliance.wait_until_running()
    appliance.wait_listening()
    assert http_status(debug, "/debug/health") == 200  # registry
    assert http_status(http, "/") in (301, 302, 308, 404)  # nginx
    assert token_lifetime(appliance) == lifetime  # auth
    assert appliance.reconfigure().returncode == 0
    assert not (appliance.root / "var/opt/appliance/pending-notifications.json").exists()


def test_a_killed_supervisord_leaves_no_orphans_and_shutdown_leaves_nothing(appliance):
    before = appliance.wait_until_running()
    os.kill(supervisord_pid(appliance), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while any(procfs.environment(p).get("APPLIANCE_SUPERVISOR") for p in before.values()) or any(
        Path(f"/proc/{p}").exists() for p in before.values()
    ):
        assert time.monotonic() < deadline, f"services outlived supervisord: {before}"
        time.sleep(0.1)

    # A leftover the kernel did not stop (started by hand with the root's marker, on the
    # token service's port): the next start finds it and stops it before binding.
    auth_port = int(appliance.config["auth"]["listen_addr"].rsplit(":", 1)[1])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {auth_port})); s.listen(); print('ok', flush=True); "
            "time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=dict(
            os.environ, APPLIANCE_SUPERVISOR=str(appliance.root / SUPERVISOR / "supervisord.conf")
        ),
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        result = appliance.reconfigure()
        assert f"pids {holder.pid}" in result.stdout
        assert holder.wait(timeout=15) is not None
        after = appliance.wait_until_running()
        tree = procfs.tree(supervisord_pid(appliance))
        assert all(pid in tree for pid in after.values()), (after, tree)
        assert token_lifetime(appliance) > 0
    finally:
        holder.kill()
        holder.wait()

    appliance.ctl("shutdown")
    deadline = time.monotonic() + 15
    while processes_of(appliance.root):
        assert time.monotonic() < deadline, processes_of(appliance.root)
        time.sleep(0.1)
    appliance.reconfigure()  # back up for the tests after this one
    appliance.wait_until_running()


def test_a_stopped_service_stays_stopped_and_one_stopped_by_accident_comes_back(appliance):
    appliance.ctl("stop", "registry")
    result = appliance.reconfigure()
    assert "service registry stays stopped (appliance-ctl stop)" in result.stdout
    assert "registry" not in appliance.pids()
    appliance.ctl("start", "registry")
    appliance.wait_until_running()
    # Stopped behind the CLI's back (supervisord's own tool, a killed run): started again.
    from appliance.services import Supervisor

    Supervisor(
        appliance.root / SUPERVISOR / "supervisord.conf",
        appliance.root / SUPERVISOR / "supervisor.sock",
    ).stop("auth")
    result = appliance.reconfigure()
    assert "+ service auth (started: it was stopped)" in result.stdout
    appliance.wait_until_running()


def listen_stranger(port: int) -> subprocess.Popen:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('ok', flush=True); "
            "time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "ok"
    return holder


@pytest.mark.parametrize("setting", ["nginx.http_port", "auth.listen_addr"])
def test_a_port_taken_by_another_process_is_named_before_anything_changes(setting):
    # auth.listen_addr is bound only when the token service listens on TCP (its default
    # is a unix socket).
    appliance = ApplianceUnderTest.create({"auth": {"listen_network": "tcp"}})
    try:
        section, key = setting.split(".")
        value = appliance.config[section][key]
        port = value if isinstance(value, int) else int(value.rsplit(":", 1)[1])
        stranger = listen_stranger(port)
        name = procfs.process_name(stranger.pid)
        try:
            result = appliance.reconfigure(check=False)
        finally:
            stranger.kill()
            stranger.wait()
        assert result.returncode == 1
        assert result.stderr == (
            f"appliance-ctl: port {port} ({setting}) is used by pid "
            f"{stranger.pid} ({name}); stop that process or set another "
            f"{setting} in appliance.yml.\n"
        )
        assert not (appliance.root / "var/opt").exists()  # nothing was written
        assert "Registry:" not in result.stdout
    finally:
        appliance.destroy()


@pytest.mark.skipif(os.geteuid() != 0, reason="service accounts exist only as root")
def test_a_root_the_service_accounts_cannot_enter_is_named_before_anything_starts():
    closed = Path(tempfile.mkdtemp(prefix="closed-"))
    os.chmod(closed, 0o700)
    appliance = None
    try:
        root = closed / "appliance"
        root.mkdir()
        appliance = ApplianceUnderTest(root=root, config={})
        fresh = ApplianceUnderTest.create()  # for its ports and password
        appliance.config = dict(fresh.config, root=str(root))
        fresh.destroy()
        appliance.write_config()
        result = appliance.reconfigure(check=False)
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"appliance-ctl: appliance-www cannot enter {closed} (mode 0700): nginx needs "
        )
        assert "Traceback" not in result.stderr
        assert not (root / "var/opt").exists()
    finally:
        if appliance is not None:
            appliance.destroy()
        subprocess.run(["rm", "-rf", str(closed)])


def test_port_helpers_find_the_holder_of_a_port():
    port = free_port()
    stranger = listen_stranger(port)
    try:
        assert procfs.listener(f"127.0.0.1:{port}") == procfs.Listener(
            stranger.pid, Path(sys.executable).name[:15]
        )
        assert procfs.listener(f"0.0.0.0:{port}").pid == stranger.pid
        assert procfs.listener(f"localhost:{port}").pid == stranger.pid
    finally:
        stranger.kill()
        stranger.wait()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        unbound = sock.getsockname()[1]
    assert procfs.listener(f"127.0.0.1:{unbound}") is None


def test_a_service_that_cannot_start_fails_every_run_with_its_real_error(appliance):
    """The registry refuses its config and prints its usage after the reason: the run,
    and the next one that changes nothing, exit 1 with the reason (not the usage)."""
    appliance.write_config({"registry": {"env": {"REGISTRY_LOG_LEVEL": "nonsense"}}})
    try:
        for _ in range(2):
            result = appliance.reconfigure(check=False)
            assert result.returncode == 1, result.stdout
            # The registry is handed over on a change: the one on the old files keeps
            # serving, and the run says why the new one would not start.
            assert "the registry kept its running configuration" in result.stderr
            assert "invalid loglevel nonsense" in result.stderr, result.stderr
            assert "help for serve" not in result.stderr
            assert "Traceback" not in result.stderr
            assert "Registry:" not in result.stdout  # no login line while it is down
    finally:
        appliance.config["registry"].pop("env")
        appliance.write_config()
    appliance.reconfigure()
    appliance.wait_until_running()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system takes root")
def test_a_no_op_reconfigure_on_a_full_log_file_system_says_so_and_succeeds(appliance):
    runs = appliance.root / "var/log/appliance/reconfigure"
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(runs)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        filler = os.open(runs / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        result = appliance.reconfigure()
        assert result.stdout.endswith(
            f"The log of this run could not be kept in {runs}: No space left on device.\n"
        )
        assert " 0/" in result.stdout and "Traceback" not in result.stderr
    finally:
        subprocess.run(["umount", str(runs)])
