"""The renewer program when appliance.yml goes away (issue 17, defect 8).

A run reads its config once; the renewer, which reads it again at each pass, must say
what is missing and wait for it, not exit into supervisord's restart loop (BACKOFF, then
FATAL: no renewals until someone notices). First under real supervisord, then the
program's loop alone with a clock that does not wait.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from appliance.programs import renewer
from appliance.services import Supervisor
from tests.support.appliance import ApplianceUnderTest


def missing_sentence(config: Path) -> str:
    return (
        f"renewer: {config} does not exist (deleted since the last reconfigure?), so no "
        f"certificate is renewed until it is back: restore it, or run appliance-ctl "
        f"reconfigure."
    )


@pytest.fixture(scope="module")
def appliance():
    appliance = ApplianceUnderTest.create(prefix="appliance-renewer-")
    try:
        appliance.reconfigure()
        yield appliance
    finally:
        appliance.destroy()


def test_the_renewer_stays_running_without_its_config_and_says_why_once(appliance):
    supervisor_dir = appliance.root / "var/opt/appliance/supervisor"
    supervisor = Supervisor(supervisor_dir / "supervisord.conf", supervisor_dir / "supervisor.sock")
    [status] = supervisor.status("renewer")
    assert status.state == "RUNNING"
    config = appliance.config_file
    log = appliance.root / "var/log/appliance/renewer/current"
    kept = config.read_bytes()
    try:
        config.unlink()
        # What a reboot, a supervisord restart or `appliance-ctl restart renewer` does.
        supervisor.restart("renewer")
        [started] = supervisor.status("renewer")
        time.sleep(3)  # startsecs is 1: a program that exits has been restarted by now
        [status] = supervisor.status("renewer")
        assert (status.state, status.pid) == ("RUNNING", started.pid)
        said = [line for line in log.read_text().splitlines() if str(config) in line]
        assert said == [missing_sentence(config)]
    finally:
        config.write_bytes(kept)


class Stop(Exception):
    """Ends the otherwise endless loop from inside the clock."""


def test_the_renewer_retries_with_backoff_and_resumes_when_the_config_is_back(tmp_path):
    config = tmp_path / "etc/appliance/appliance.yml"
    config.parent.mkdir(parents=True)
    text = yaml.safe_dump({"root": str(tmp_path), "external_url": "https://localhost"})
    said: list[str] = []
    slept: list[float] = []

    def clock(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            config.write_text(text)  # the admin restores it
        elif len(slept) == 4:
            raise Stop

    with pytest.raises(Stop):
        renewer.renew_forever(config, named=True, say=said.append, sleep=clock)
    assert slept[:3] == [60, 120, 240]  # looked at again, less and less often
    assert said[:2] == [
        missing_sentence(config),  # said once for three looks
        f"renewer: {config} can be used again; renewals resume.",
    ]
    assert said[2].startswith("renewer: next check at ") and len(said) == 3
    assert 0 < slept[3] <= 12 * 3600 + 1  # self-signed: two slots a day
