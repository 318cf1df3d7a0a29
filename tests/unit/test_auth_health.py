"""/-/health, which nginx serves to anyone: a bare status, the reason only in the log."""

from __future__ import annotations

import sqlite3

from appliance.auth.app import TokenService
from tests.support.auth_requests import call
from tests.support.auth_server import make_config


def test_an_unhealthy_answer_says_nothing_of_why(tmp_path, monkeypatch, capsys):
    service = TokenService(make_config(tmp_path))
    assert (call(service, path="/-/health").status, call(service, path="/-/health").body) == (
        200,
        {"status": "ok"},
    )

    def broken() -> None:
        raise sqlite3.OperationalError(f"unable to open database file {tmp_path}/auth.db")

    monkeypatch.setattr(service.store, "ping", broken)
    answer = call(service, path="/-/health")
    assert (answer.status, answer.body) == (503, {"status": "unhealthy"})
    assert f"unable to open database file {tmp_path}/auth.db" in capsys.readouterr().err
