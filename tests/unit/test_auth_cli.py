"""The admin commands, called the way appliance-ctl calls them: register() on a parser,
parse, then handler(args, context)."""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.auth import cli
from appliance.auth import store as auth_store
from appliance.auth.app import TokenService
from appliance.errors import ApplianceError
from tests.support.auth_requests import call, token_query, use_cheap_hasher
from tests.support.auth_server import make_config


@dataclass
class Context:
    auth_database: Path
    default_registry_enabled: bool = True


@pytest.fixture
def ctl(tmp_path: Path, monkeypatch, auth_database):
    """The commands on each engine (SQLite, PostgreSQL) in turn."""
    use_cheap_hasher(monkeypatch)
    config = make_config(tmp_path, database=auth_database)
    context = Context(config.database)
    parser = argparse.ArgumentParser(prog="appliance-ctl")
    cli.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str, stdin: str | None = None) -> int:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        args = parser.parse_args(argv)
        return args.handler(args, context)

    run.config, run.context = config, context
    return run


def test_user_lifecycle(ctl, capsys) -> None:
    assert ctl("user", "create", "alice", "--password-stdin", stdin="first password\n") == 0
    assert ctl("user", "create", "root2", "--admin", "--password-stdin", stdin="pw root 22\n") == 0
    assert "Created user alice." in capsys.readouterr().out
    ctl("user", "list")
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["USERNAME", "ADMIN", "BLOCKED", "CREATED"]
    assert listing[1].split()[:3] == ["alice", "no", "no"]
    assert listing[2].split()[:3] == ["root2", "yes", "no"]
    ctl("user", "block", "alice")
    capsys.readouterr()
    ctl("user", "list")
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["alice", "no", "yes"]
    ctl("user", "unblock", "alice")
    ctl("user", "delete", "alice")
    assert auth_store.Store(ctl.context.auth_database).find_user("alice") is None


def test_passwd_takes_effect_for_sign_in(ctl) -> None:
    ctl("user", "create", "alice", "--password-stdin", stdin="first password\n")
    service = TokenService(ctl.config)
    assert call(service, query=token_query(), basic=("alice", "first password")).status == 200
    ctl("user", "passwd", "alice", "--password-stdin", stdin="second password\n")
    assert call(service, query=token_query(), basic=("alice", "first password")).status == 401
    assert call(service, query=token_query(), basic=("alice", "second password")).status == 200


def test_password_is_never_an_argument(ctl) -> None:
    with pytest.raises(SystemExit):
        ctl("user", "create", "alice", "--password", "secret")


def test_prompt_needs_a_terminal(ctl) -> None:
    with pytest.raises(ApplianceError, match="use --password-stdin"):
        ctl("user", "create", "alice", stdin="")


def test_short_password_is_refused(ctl) -> None:
    with pytest.raises(ApplianceError, match="at least 8 characters"):
        ctl("user", "create", "alice", "--password-stdin", stdin="short\n")


def test_projects_members_and_registry_default(ctl, capsys) -> None:
    ctl("user", "create", "alice", "--password-stdin", stdin="first password\n")
    ctl("project", "create", "team/app", "--visibility", "internal", "--owner", "alice")
    ctl.context.default_registry_enabled = False
    ctl("project", "create", "team/quiet")
    ctl("project", "create", "team/loud", "--registry")
    capsys.readouterr()
    ctl("project", "list")
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [
        ["team/app", "internal", "enabled"],
        ["team/loud", "private", "enabled"],
        ["team/quiet", "private", "disabled"],
    ]
    ctl("project", "update", "team/quiet", "--visibility", "public", "--registry")
    project = auth_store.Store(ctl.context.auth_database).project("team/quiet")
    assert (project.visibility, project.registry_enabled) == ("public", True)

    ctl("member", "add", "team/quiet", "alice", "developer")
    ctl("member", "add", "team/quiet", "alice", "maintainer")  # changes the role
    capsys.readouterr()
    ctl("member", "list", "team/quiet")
    assert capsys.readouterr().out.splitlines()[1].split() == ["alice", "maintainer"]
    ctl("member", "remove", "team/quiet", "alice")
    ctl("project", "delete", "team/quiet")
    assert auth_store.Store(ctl.context.auth_database).find_project("team/quiet") is None


def test_tokens_are_shown_once_and_work(ctl, capsys) -> None:
    ctl("user", "create", "alice", "--password-stdin", stdin="first password\n")
    ctl("project", "create", "team/app", "--owner", "alice")
    capsys.readouterr()
    ctl(
        "token",
        "create",
        "alice",
        "--name",
        "ci",
        "--scope",
        "read_registry",
        "--expires",
        "2999-12-31",
    )
    secret = capsys.readouterr().out.splitlines()[-1]
    assert secret.startswith("apat_")
    ctl("deploy-token", "create", "team/app", "--name", "k8s", "--scope", "read_registry")
    lines = capsys.readouterr().out.splitlines()
    username = lines[-2].removeprefix("username: ")
    password = lines[-1].removeprefix("password: ")

    service = TokenService(ctl.config)
    query = token_query("repository:team/app:pull")
    assert call(service, query=query, basic=("alice", secret)).status == 200
    assert call(service, query=query, basic=(username, password)).status == 200

    ctl("token", "list", "alice")
    listing = capsys.readouterr().out
    assert secret not in listing and "2999-12-31 23:59 UTC" in listing and "active" in listing
    ctl("token", "revoke", "alice", "1")
    ctl("deploy-token", "revoke", "team/app", "1")
    capsys.readouterr()
    ctl("deploy-token", "list", "team/app")
    assert "revoked" in capsys.readouterr().out
    assert call(service, query=query, basic=("alice", secret)).status == 401
    assert call(service, query=query, basic=(username, password)).status == 401


# argv, the one sentence expected
BAD_ARGUMENTS = [
    (("user", "block", "ghost"), "There is no user named 'ghost'."),
    (
        ("user", "create", "Bad_Name", "--password-stdin"),
        "Invalid username 'Bad_Name': 'Bad_Name' contains uppercase letters",
    ),
    (
        ("project", "create", "team/_app"),
        "Invalid project path 'team/_app': '_app' starts with an underscore",
    ),
    (("project", "create", "team/app-"), "'app-' ends with a hyphen"),
    (("project", "create", "team/my--app"), "double hyphen"),
    (("project", "create", "team/app", "--owner", "ghost"), "There is no user named 'ghost'."),
    (("project", "update", "team/none", "--registry"), "There is no project 'team/none'."),
    (("project", "update", "team/app"), "Nothing to change"),
    (
        ("member", "add", "team/app", "alice", "boss"),
        "'boss' is not a valid role; choose one of: guest, reporter, developer, maintainer, owner.",
    ),
    (("member", "remove", "team/app", "alice"), "User 'alice' is not a member of project"),
    (("token", "revoke", "alice", "42"), "User 'alice' has no personal access token 42."),
    (
        (
            "token",
            "create",
            "alice",
            "--name",
            "x",
            "--scope",
            "read_registry",
            "--expires",
            "2001-01-01",
        ),
        "is in the past",
    ),
    (
        (
            "token",
            "create",
            "alice",
            "--name",
            "x",
            "--scope",
            "read_registry",
            "--expires",
            "soon",
        ),
        "is not a date",
    ),
    (
        ("deploy-token", "create", "team/none", "--name", "x", "--scope", "read_registry"),
        "There is no project 'team/none'.",
    ),
]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS)
def test_bad_arguments_raise_one_clear_sentence(ctl, argv, message) -> None:
    ctl("user", "create", "alice", "--password-stdin", stdin="first password\n")
    ctl("project", "create", "team/app")
    with pytest.raises(ApplianceError) as raised:
        ctl(*argv, stdin="a fine password\n")
    text = str(raised.value)
    assert message in text
    assert text.endswith(".") and "\n" not in text


def test_missing_database_says_what_to_do(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["user", "list"])
    with pytest.raises(ApplianceError, match="run 'appliance-ctl reconfigure' first"):
        args.handler(args, Context(tmp_path / "missing.db"))


def test_user_cannot_take_over_a_group_namespace(ctl) -> None:
    ctl("project", "create", "team/app")
    with pytest.raises(ApplianceError, match="namespace 'team' is used by project 'team/app'"):
        ctl("user", "create", "team", "--password-stdin", stdin="a fine password\n")
