"""`appliance-ctl project retention` and the retention default of `project create`,
called as appliance-ctl calls them, on a real auth database of each engine (SQLite,
PostgreSQL)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.auth import cli
from appliance.auth.store import Store
from appliance.errors import ApplianceError
from appliance.retention import Policy
from appliance.settings import RetentionDefaultSettings, RetentionSettings
from tests.support.auth_requests import use_cheap_hasher
from tests.support.auth_server import make_config


@dataclass
class Context:
    auth_database: Path
    default_registry_enabled: bool = True
    retention: RetentionSettings = field(default_factory=RetentionSettings)


@pytest.fixture
def ctl(tmp_path: Path, monkeypatch, auth_database):
    use_cheap_hasher(monkeypatch)
    context = Context(make_config(tmp_path, database=auth_database).database)
    parser = argparse.ArgumentParser(prog="appliance-ctl")
    cli.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        return args.handler(args, context)

    run.context = context
    return run


def policies(ctl) -> dict[str, Policy]:
    store = Store(ctl.context.auth_database)
    try:
        return store.retention_policies()
    finally:
        store.close()


def test_set_show_replace_and_remove(ctl, capsys):
    ctl("project", "create", "team/app")
    ctl(
        "project",
        "retention",
        "team/app",
        "--keep-last",
        "10",
        "--keep",
        "^v",
        "--older-than",
        "30d",
    )
    out = capsys.readouterr().out
    assert "Retention policy of team/app: keeps the newest 10 per repository" in out
    assert "appliance-ctl retention run team/app --dry-run" in out
    assert policies(ctl) == {"team/app": Policy(keep_last=10, keep=("^v",), older_than=30 * 86400)}
    # The options replace the policy whole.
    ctl("project", "retention", "team/app", "--older-than", "2w", "--max-delete", "5")
    assert policies(ctl)["team/app"] == Policy(older_than=14 * 86400, max_delete=5)
    ctl("project", "retention", "team/app", "--show")
    assert "tags pushed within 2w; deletes the other tags; a run that would delete more than 5" in (
        capsys.readouterr().out
    )
    ctl("project", "show", "team/app")
    assert "Retention policy of team/app: keeps tags pushed within 2w" in capsys.readouterr().out
    ctl("project", "retention", "team/app", "--off")
    assert policies(ctl) == {}
    ctl("project", "retention", "team/app")
    assert "Retention policy of team/app: none" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pulled-within", "14d"], "needs --keep-last N or --older-than AGE"),
        (["--show", "--keep-last", "3"], "--show goes alone"),
        (["--off", "--older-than", "3d"], "--off goes alone"),
        (["--keep-last", "3", "--keep", "(x"], "--keep '\\(x' is not a valid regular expression"),
        (["--older-than", "3 days"], "--older-than '3 days' is not an age"),
    ],
)
def test_a_bad_policy_is_one_sentence_and_nothing_is_written(ctl, argv, message):
    ctl("project", "create", "team/app")
    ctl("project", "retention", "team/app", "--keep-last", "1")
    with pytest.raises(ApplianceError, match=message):
        ctl("project", "retention", "team/app", *argv)
    assert policies(ctl) == {"team/app": Policy(keep_last=1)}


def test_an_unknown_project_is_named(ctl):
    with pytest.raises(ApplianceError, match="There is no project 'no/such'"):
        ctl("project", "retention", "no/such", "--keep-last", "1")


def test_new_projects_get_the_default_policy_when_it_is_enabled(ctl, capsys):
    ctl("project", "create", "before/app")
    assert policies(ctl) == {}
    ctl.context.retention = RetentionSettings(
        RetentionDefaultSettings(enable=True, keep=["^v"], pulled_within="14d", max_delete=100)
    )
    ctl("project", "create", "after/app")
    assert "Retention policy (retention.default in appliance.yml): keeps the newest 10" in (
        capsys.readouterr().out
    )
    assert policies(ctl) == {
        "after/app": Policy(
            keep_last=10,
            keep=("^v",),
            older_than=30 * 86400,
            pulled_within=14 * 86400,
            max_delete=100,
        )
    }


def test_a_deleted_project_takes_its_policy_with_it(ctl):
    ctl("project", "create", "team/app")
    ctl("project", "retention", "team/app", "--keep-last", "1")
    ctl("project", "delete", "team/app")
    ctl("project", "create", "team/app")  # a new project of the same path: no policy
    assert policies(ctl) == {}
