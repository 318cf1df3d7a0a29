"""appliance.services against a real supervisord running small real programs.

The programs are shell loops rather than nginx or the registry: what is under test is
how we drive supervisord (start, stop, update, signals, logs, faults), and a shell loop
makes each behaviour observable in its log. The whole-appliance tests drive the real
services through the same class.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from appliance import services
from appliance.services import (
    ServiceError,
    Supervisor,
    SupervisorNotRunningError,
    UnknownServiceError,
)

SUPERVISORD_CONF = """\
[unix_http_server]
file = {socket}
chmod = 0700

[supervisord]
logfile = {root}/supervisord.log
pidfile = {root}/supervisord.pid
nodaemon = false

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[include]
files = {root}/conf.d/*.conf
"""

PROGRAM_CONF = """\
[program:{name}]
command = /bin/sh -c '{script}'
autostart = true
autorestart = true
startsecs = {startsecs}
stopasgroup = true
killasgroup = true
redirect_stderr = true
stdout_logfile = {root}/log/{name}/current
stdout_logfile_maxbytes = {max_bytes}
stdout_logfile_backups = 2
"""

WAITER = 'trap "echo reloaded" HUP; echo started; while :; do sleep 0.05; done'


def write_program(
    root: Path, name: str, script: str = WAITER, max_bytes: str = "1MB", startsecs: int = 0
) -> None:
    (root / "log" / name).mkdir(parents=True, exist_ok=True)
    (root / "conf.d" / f"{name}.conf").write_text(
        PROGRAM_CONF.format(
            name=name, script=script, root=root, max_bytes=max_bytes, startsecs=startsecs
        )
    )


def wait_for(predicate, timeout: float = 10, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def supervisor(tmp_path: Path):
    (tmp_path / "conf.d").mkdir()
    socket = tmp_path / "s.sock"
    config = tmp_path / "supervisord.conf"
    config.write_text(SUPERVISORD_CONF.format(socket=socket, root=tmp_path))
    write_program(tmp_path, "alpha")
    write_program(tmp_path, "beta")
    supervisor = Supervisor(config, socket)
    supervisor.root = tmp_path  # type: ignore[attr-defined]
    yield supervisor
    supervisor.shutdown()


def pid_of(supervisor: Supervisor, name: str) -> int:
    [status] = supervisor.status(name)
    return status.pid


def test_ensure_running_starts_supervisord_once(supervisor):
    assert not supervisor.is_running()
    assert supervisor.ensure_running() is True
    assert supervisor.is_running()
    assert supervisor.ensure_running() is False
    statuses = wait_for(
        lambda: (
            [s for s in supervisor.status() if s.running] == supervisor.status()
            and supervisor.status()
        ),
        what="both programs running",
    )
    assert [s.name for s in statuses] == ["alpha", "beta"]
    for status in statuses:
        assert status.pid > 0 and os.path.exists(f"/proc/{status.pid}")
        assert status.line() == f"run: {status.name}: (pid {status.pid}) {status.uptime}s"


def test_start_and_stop_are_idempotent(supervisor):
    supervisor.ensure_running()
    supervisor.start("alpha")  # already started: nothing to do
    pid = pid_of(supervisor, "alpha")
    supervisor.stop("alpha")
    [status] = supervisor.status("alpha")
    assert (status.state, status.pid, status.uptime) == ("STOPPED", 0, 0)
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert status.line().startswith("down: alpha: stopped")
    supervisor.stop("alpha")  # not running: nothing to do
    supervisor.start("alpha")
    assert supervisor.status("alpha")[0].running


def test_restart_gives_a_new_process(supervisor):
    supervisor.ensure_running()
    before = pid_of(supervisor, "alpha")
    supervisor.restart("alpha")
    after = pid_of(supervisor, "alpha")
    assert after != before and after > 0
    assert pid_of(supervisor, "beta") > 0


def test_signal_reaches_the_program_and_a_stopped_one_is_skipped(supervisor):
    supervisor.ensure_running()
    wait_for(lambda: "started" in "".join(supervisor.tail("alpha")), what="alpha to start")
    pid = pid_of(supervisor, "alpha")
    assert supervisor.signal("alpha", "HUP") is True
    wait_for(lambda: "reloaded" in "".join(supervisor.tail("alpha")), what="the HUP trap")
    assert pid_of(supervisor, "alpha") == pid  # reloaded, not restarted
    supervisor.stop("beta")
    assert supervisor.signal("beta", "HUP") is False


def test_unknown_service_names_the_valid_ones(supervisor):
    supervisor.ensure_running()
    for action in (
        supervisor.start,
        supervisor.stop,
        supervisor.restart,
        supervisor.status,
        lambda name: supervisor.signal(name, "HUP"),
        lambda name: list(supervisor.tail(name)),
    ):
        with pytest.raises(UnknownServiceError) as error:
            action("gamma")
        assert str(error.value) == "Unknown service 'gamma'; valid services: alpha, beta."
        assert error.value.exit_code == 2


def test_update_adds_restarts_changed_and_removes_programs(supervisor):
    root = supervisor.root
    supervisor.ensure_running()
    alpha, beta = pid_of(supervisor, "alpha"), pid_of(supervisor, "beta")
    assert supervisor.update() == {"added": [], "changed": [], "removed": []}

    write_program(root, "gamma")
    write_program(root, "beta", script=WAITER.replace("started", "started v2"))
    (root / "conf.d/alpha.conf").unlink()
    assert supervisor.update() == {"added": ["gamma"], "changed": ["beta"], "removed": ["alpha"]}

    assert supervisor.names() == ["beta", "gamma"]
    assert (
        not os.path.exists(f"/proc/{alpha}")
        or "zombie" in Path(f"/proc/{alpha}/status").read_text()
    )
    wait_for(lambda: pid_of(supervisor, "gamma"), what="gamma to run")
    new_beta = wait_for(lambda: pid_of(supervisor, "beta"), what="beta to run")
    assert new_beta != beta
    wait_for(lambda: "started v2" in "".join(supervisor.tail("beta")), what="beta v2")


def test_a_killed_program_is_brought_back(supervisor):
    supervisor.ensure_running()
    pid = wait_for(lambda: pid_of(supervisor, "alpha"), what="alpha to run")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid_of(supervisor, "alpha") not in (0, pid), what="alpha to come back")


def test_tail_shows_the_end_of_the_log(supervisor):
    write_program(
        supervisor.root,
        "counter",
        script="i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done; exec sleep 60",
    )
    supervisor.ensure_running()
    wait_for(lambda: "line 2999" in "".join(supervisor.tail("counter")), what="3000 lines")
    text = "".join(supervisor.tail("counter"))
    assert len(text) <= services.TAIL_INITIAL_BYTES
    assert text.startswith("line ") and text.endswith("line 2999\n")


def test_tail_follows_the_log_across_rotations(supervisor, monkeypatch):
    monkeypatch.setattr(services, "TAIL_POLL_SECONDS", 0.02)
    write_program(
        supervisor.root,
        "chatty",
        max_bytes="2KB",
        script="i=0; while :; do echo line $i; i=$((i+1)); sleep 0.005; done",
    )
    supervisor.ensure_running()
    follow = supervisor.tail("chatty", follow=True)
    seen = ""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        seen += next(follow)
    follow.close()
    log_dir = supervisor.root / "log/chatty"
    assert (log_dir / "current.1").exists(), "the log never rotated"
    numbers = [int(line.split()[1]) for line in seen.splitlines()[:-1]]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "lines were lost"
    assert len(numbers) > 200


def test_shutdown_stops_every_program_and_supervisord(supervisor):
    supervisor.ensure_running()
    pids = [wait_for(lambda n=n: pid_of(supervisor, n), what=n) for n in ("alpha", "beta")]
    supervisor.shutdown()
    assert not supervisor.is_running()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    supervisor.shutdown()  # not running: nothing to do


def test_commands_without_supervisord_say_how_to_fix_it(supervisor):
    with pytest.raises(SupervisorNotRunningError) as error:
        supervisor.status()
    assert str(error.value) == "supervisord is not running; run appliance-ctl reconfigure."


def test_a_stale_socket_after_supervisord_was_killed(supervisor):
    supervisor.ensure_running()
    pid = int((supervisor.root / "supervisord.pid").read_text())
    programs = [wait_for(lambda n=n: pid_of(supervisor, n), what=n) for n in ("alpha", "beta")]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="supervisord to die")
    for program in programs:  # orphans of the killed supervisord
        os.kill(program, signal.SIGKILL)
    assert supervisor.socket_path.exists()
    assert not supervisor.is_running()
    assert supervisor.ensure_running() is True


def test_broken_config_is_a_clear_error(tmp_path):
    config = tmp_path / "supervisord.conf"
    config.write_text(
        "[supervisord]\nlogfile = /nonexistent/dir/supervisord.log\n"
        "[unix_http_server]\nfile = " + str(tmp_path / "s.sock") + "\n"
    )
    with pytest.raises(ServiceError, match="supervisord did not start with"):
        Supervisor(config, tmp_path / "s.sock").ensure_running()


def test_a_socket_path_too_long_for_unix_sockets_is_a_clear_error(tmp_path):
    socket = tmp_path / ("x" * 120) / "supervisor.sock"
    with pytest.raises(ServiceError, match="longer than 107 bytes"):
        Supervisor(tmp_path / "supervisord.conf", socket).is_running()


def test_tail_of_every_service_labels_each_log(supervisor):
    supervisor.ensure_running()
    wait_for(
        lambda: all("started" in "".join(supervisor.tail(n)) for n in ("alpha", "beta")),
        what="both programs to log",
    )
    text = "".join(supervisor.tail())
    assert text.startswith("==> alpha <==\nstarted\n")
    assert "started\n\n==> beta <==\nstarted\n" in text


def test_the_whole_appliance_runs_as_an_ordinary_user(tmp_path):
    """On a temporary root an ordinary user runs every service as itself: no accounts,
    no `user` lines, nothing owned by anyone else. As root, the test becomes nobody."""
    import pwd
    import shutil
    import subprocess
    import sys

    from tests.support.appliance import ApplianceUnderTest
    from tests.support.oci import build_image

    as_user: list[str] = []
    uid = os.geteuid()
    if uid == 0:
        nobody = pwd.getpwnam("nobody")
        uid = nobody.pw_uid
        as_user = [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
        ]
    appliance = ApplianceUnderTest.create(prefix="appliance-user-")
    ctl = [*as_user, str(Path(sys.prefix) / "bin/appliance-ctl"), "-c", str(appliance.config_file)]
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(appliance.root)}
    try:
        if as_user:
            shutil.chown(appliance.root, uid)
            for path in appliance.root.rglob("*"):
                shutil.chown(path, uid)
        result = subprocess.run(
            [*ctl, "reconfigure"], capture_output=True, text=True, env=environment, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        pids = wait_for(
            lambda: appliance.pids() if len(appliance.pids()) >= 3 else None, what="the services"
        )
        for name in ("nginx", "registry", "auth"):
            assert os.stat(f"/proc/{pids[name]}").st_uid == uid, name
            workers = subprocess.run(
                ["pgrep", "-P", str(pids[name])], capture_output=True, text=True
            ).stdout.split()
            assert all(os.stat(f"/proc/{w}").st_uid == uid for w in workers), name
        foreign = [p for p in appliance.root.rglob("*") if p.lstat().st_uid != uid]
        assert foreign == []
        program = appliance.root / "var/opt/appliance/supervisor/conf.d/registry.conf"
        assert "user =" not in program.read_text()

        client = appliance.skopeo(tmp_path / "client")
        image = build_image(tmp_path / "image", tag="mine")
        client.push(image, "root/mine", "mine")
        assert (
            client.pull("root/mine", "mine", tmp_path / "pulled").manifest_digest
            == image.manifest_digest
        )
    finally:
        subprocess.run([*ctl, "shutdown"], capture_output=True, env=environment, timeout=60)
        appliance.destroy()


def test_a_program_that_cannot_start_says_why(supervisor):
    write_program(
        supervisor.root,
        "broken",
        startsecs=1,
        script="echo registry: configuration error: no storage; exit 1",
    )
    supervisor.ensure_running()
    wait_for(
        lambda: supervisor.status("broken")[0].state in ("BACKOFF", "FATAL"), what="broken to fail"
    )
    supervisor.stop("broken")
    with pytest.raises(ServiceError) as error:
        supervisor.start("broken")
    message = str(error.value)
    assert message.startswith("Cannot start broken: ")
    assert message.endswith("ends with: registry: configuration error: no storage")


def test_wait_until_running_names_what_did_not_come_up(supervisor):
    write_program(
        supervisor.root,
        "broken",
        startsecs=1,
        script="echo registry: configuration error: no storage; exit 1",
    )
    (supervisor.root / "conf.d/broken.conf").write_text(
        (supervisor.root / "conf.d/broken.conf").read_text() + "startretries = 1\n"
    )
    supervisor.ensure_running()
    supervisor.wait_until_running(["alpha", "beta"], timeout=10)
    with pytest.raises(ServiceError) as error:
        supervisor.wait_until_running(["alpha", "broken"], timeout=15)
    assert str(error.value) == (
        "Not running: broken is fatal (registry: configuration error: no storage)."
    )


def test_a_program_that_cannot_start_is_reported_with_its_first_error_not_its_usage(supervisor):
    """The registry answers a bad config with its error, then `serve`'s usage text: the
    report must carry the error, and only what was logged since this start."""
    log = supervisor.root / "log" / "broken" / "current"
    write_program(
        supervisor.root,
        "broken",
        startsecs=1,
        script=(
            "echo configuration error: open /etc/x.yml: no such file or directory; "
            "echo Usage:; echo '  registry serve <config> [flags]'; "
            "echo '  -h, --help   help for serve'; exit 1"
        ),
    )
    (supervisor.root / "conf.d/broken.conf").write_text(
        (supervisor.root / "conf.d/broken.conf")
        .read_text()
        .replace("autostart = true", "autostart = false")
        + "startretries = 1\n"
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("an old failure: error: from a start before this one\n")
    since = {"broken": log.stat().st_size}
    supervisor.ensure_running()
    with pytest.raises(ServiceError):  # startProcess waits, and the start fails
        supervisor.start("broken")
    with pytest.raises(ServiceError) as error:
        supervisor.wait_until_running(["broken"], timeout=15, since=since)
    assert str(error.value) == (
        "Not running: broken is fatal (configuration error: open "
        "/etc/x.yml: no such file or directory)."
    )
