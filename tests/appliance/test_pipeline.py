"""The pipeline's conductor against a real supervisord: each notification is carried out
the way the service's contract says, and the contract alone decides it.

The programs are shell loops (as in test_services) that log each SIGHUP they get, so a
reload that kept the process and a restart that replaced it are told apart by pid and
log, as an admin would tell them apart.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from appliance.contracts import RESTART, Service, signal
from appliance.pipeline import Conductor, Run
from appliance.resources import reload, restart
from appliance.services import Supervisor
from tests.appliance.test_services import PROGRAM_CONF, SUPERVISORD_CONF, WAITER
from tests.support.recipes import settings_for


@pytest.fixture
def settings():
    root = Path(tempfile.mkdtemp(prefix="pipeline-"))  # short: a unix socket lives there
    settings = settings_for(root)
    directory = settings.paths.supervisor_dir
    (directory / "conf.d").mkdir(parents=True)
    settings.paths.supervisor_config.write_text(
        SUPERVISORD_CONF.format(socket=settings.paths.supervisor_socket, root=directory)
    )
    for name in ("alpha", "beta", "gamma", "delta"):
        (directory / "log" / name).mkdir(parents=True)
        (directory / "conf.d" / f"{name}.conf").write_text(
            PROGRAM_CONF.format(
                name=name, script=WAITER, root=directory, max_bytes="1MB", startsecs=0
            )
        )
    supervisor = Supervisor(settings.paths.supervisor_config, settings.paths.supervisor_socket)
    supervisor.ensure_running()
    supervisor.wait_until_running(["alpha", "beta", "gamma", "delta"])
    yield settings
    supervisor.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def log_of(settings, name: str) -> str:
    return (settings.paths.supervisor_dir / "log" / name / "current").read_text()


def test_notifications_follow_each_services_contract(settings):
    supervisor = Supervisor(settings.paths.supervisor_config, settings.paths.supervisor_socket)
    before = {s.name: s.pid for s in supervisor.status()}
    waited: list[str] = []

    def wait_after_reload(pid: int):  # noqa: ANN202 - the ReloadWait shape
        waited.append(f"before HUP of {pid}")
        return lambda: waited.append("after HUP")

    services = [
        Service("alpha", reload=signal("HUP"), wait_after_reload=wait_after_reload),
        Service("beta", reload=RESTART),
        Service("gamma", reload=RESTART, graceful_restart="HUP"),
        Service("delta", reload=RESTART),
    ]
    run = Run(
        name="test",
        log_name="test",
        resources=lambda secrets: [],
        services=services,
        secrets=lambda: None,
    )
    said: list[str] = []
    touched = Conductor(settings, run, said.append).notify(
        [reload("alpha"), reload("beta"), restart("gamma"), restart("delta")],
        programs_changed=False,
    )
    assert touched == {"alpha", "beta", "gamma", "delta"}
    assert said == [
        "+ service alpha (reloaded)",
        "+ service beta (restarted)",
        "+ service gamma (restarted by HUP)",
        "+ service delta (restarted)",
    ]
    after = {s.name: s.pid for s in supervisor.status()}
    assert after["alpha"] == before["alpha"] and after["gamma"] == before["gamma"]
    assert after["beta"] != before["beta"] and after["delta"] != before["delta"]
    assert waited == [f"before HUP of {before['alpha']}", "after HUP"]
    deadline = time.monotonic() + 5
    while "reloaded" not in log_of(settings, "gamma") or "reloaded" not in log_of(
        settings, "alpha"
    ):
        assert time.monotonic() < deadline, "the HUP never reached the program"
        time.sleep(0.05)
    assert "reloaded" not in log_of(settings, "beta")


def test_a_stranger_on_a_services_ready_address_is_named_not_taken_for_it(tmp_path):
    """The service runs (RUNNING), but another process holds its address:
    connecting would succeed, and nginx would proxy tokens to the stranger."""
    from appliance.errors import ServiceError
    from appliance.services import ProcessStatus
    from tests.appliance.test_reliability import listen_stranger
    from tests.support.appliance import free_port

    port = free_port()
    address = f"127.0.0.1:{port}"
    service = Service("auth", ready=address, binds={address: "auth.listen_addr"})
    run = Run(
        name="test",
        log_name="test",
        resources=lambda secrets: [],
        services=[service],
        secrets=lambda: None,
    )
    conductor = Conductor(settings_for(tmp_path), run, lambda line: None)
    ours = subprocess.Popen(["sleep", "30"])  # the service's own process: it binds nothing
    stranger = listen_stranger(port)
    try:
        with pytest.raises(ServiceError) as error:
            conductor.wait_answering(
                [service], {"auth": ProcessStatus("auth", "RUNNING", ours.pid, 1, "")}, timeout=2
            )
    finally:
        for process in (stranger, ours):
            process.kill()
            process.wait()
    assert str(error.value).startswith(f"auth does not answer on {address}: pid {stranger.pid} (")
    assert str(error.value).endswith(
        "holds it; stop that process or set another auth.listen_addr in appliance.yml."
    )
