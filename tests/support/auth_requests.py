"""Calling the token service's WSGI application in-process, the way a server would."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from urllib.parse import urlencode

from argon2 import PasswordHasher

from appliance.auth import credentials

# argon2 at its production cost takes ~0.1 s per hash; unit tests hash dozens of times.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: dict

    @property
    def message(self) -> str:
        return self.body["errors"][0]["message"]


def call(
    app,
    method: str = "GET",
    path: str = "/jwt/auth",
    query: list | None = None,
    form: dict | None = None,
    basic: tuple[str, str] | None = None,
    peer: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> Response:
    data = urlencode(form or {}).encode()
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": urlencode(query or [], safe=":,/*"),
        "REMOTE_ADDR": peer,
        "CONTENT_LENGTH": str(len(data)),
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "wsgi.input": io.BytesIO(data),
    }
    if basic:
        encoded = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        environ["HTTP_AUTHORIZATION"] = f"Basic {encoded}"
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    captured = {}

    def start_response(status: str, response_headers: list) -> None:
        captured["status"] = int(status.split()[0])
        captured["headers"] = dict(response_headers)

    body = b"".join(app(environ, start_response))
    return Response(captured["status"], captured["headers"], json.loads(body))


def token_query(*scopes: str, service: str = "container_registry", **extra: str) -> list:
    return [("service", service), *(("scope", s) for s in scopes), *extra.items()]


def use_cheap_hasher(monkeypatch) -> None:
    monkeypatch.setattr(credentials, "_hasher", CHEAP_HASHER)
