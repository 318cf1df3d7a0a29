"""The janitor's loop (appliance/programs/janitor.py) on a fake clock: it waits for its
first slot, runs once a period at the host's offset, keeps janitor.json, and outlives a
config that cannot be used. The run itself is tests/appliance/test_retention.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from appliance.programs import janitor
from appliance.retention import next_run


class Stop(Exception):
    pass


def loop(config: Path, monkeypatch, sleeps: int, start: float = 1_800_000_000.0):
    """Run the loop for `sleeps` sleeps; returns (run times, said lines)."""
    now = [start]
    runs: list[float] = []
    said: list[str] = []
    left = [sleeps]

    def sleep(seconds: float) -> None:
        left[0] -= 1
        if left[0] < 0:
            raise Stop
        now[0] += seconds

    def run_once(settings, say) -> dict:  # noqa: ANN001
        runs.append(now[0])
        return {"finished": int(now[0]), "result": "ok", "deleted_tags": 1, "freed_bytes": 9}

    monkeypatch.setattr(janitor, "run_once", run_once)
    with pytest.raises(Stop):
        janitor.janitor_forever(config, True, said.append, sleep=sleep, clock=lambda: now[0])
    return runs, said


def write(config: Path, **janitor_settings) -> None:
    config.write_text(
        yaml.safe_dump(
            {"root": str(config.parent), "janitor": {"enable": True, **janitor_settings}}
        )
    )


def test_it_runs_once_a_period_at_the_hosts_offset(tmp_path, monkeypatch):
    config = tmp_path / "appliance.yml"
    write(config, schedule="1h")
    runs, said = loop(config, monkeypatch, sleeps=3)
    assert len(runs) == 3  # the first sleep only waits for the first slot
    first = next_run(1_800_000_000.0, "localhost", 3600)
    assert runs == [first, first + 3600, first + 7200]
    state = json.loads((tmp_path / "var/opt/appliance/janitor.json").read_text())
    assert state["last"]["finished"] == int(runs[-1]) and state["next"] == int(first + 10800)
    assert said[0].startswith("janitor: next run at ")


def test_an_unusable_config_is_said_once_and_waited_out(tmp_path, monkeypatch):
    config = tmp_path / "appliance.yml"
    config.write_text("janitor: {schedule: soon}\n")
    runs, said = loop(config, monkeypatch, sleeps=3)
    assert runs == []
    problems = [line for line in said if "so the janitor waits until it is fixed" in line]
    assert len(problems) == 1 and "janitor.schedule" in problems[0]


def test_turned_off_in_the_file_it_runs_no_more_before_the_reconfigure(tmp_path, monkeypatch):
    config = tmp_path / "appliance.yml"
    config.write_text(yaml.safe_dump({"root": str(tmp_path), "janitor": {"enable": False}}))
    runs, said = loop(config, monkeypatch, sleeps=2)
    assert runs == []
    assert "janitor: janitor.enable is false in appliance.yml: no run" in said
