"""A cookie-keeping client of the pages' WSGI application, in-process (unit tests and
the bench): what a browser sends, minus the browser."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit


@dataclass
class Page:
    status: int
    headers: list[tuple[str, str]]
    text: str

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def cookies_set(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "set-cookie"]

    @property
    def csrf_token(self) -> str:
        match = re.search(r'name="csrf_token" value="([^"]+)"', self.text)
        assert match, "the page has no form with a CSRF token"
        return match.group(1)


@dataclass
class WebClient:
    app: object
    host: str = "registry.example:5050"
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        target: str,
        form: dict | list | None = None,
        headers: dict[str, str] | None = None,
    ) -> Page:
        parts = urlsplit(target)
        data = urlencode(form or {}, doseq=True).encode()
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_HOST": self.host,
            "CONTENT_LENGTH": str(len(data)),
            "CONTENT_TYPE": "application/x-www-form-urlencoded",
            "wsgi.input": io.BytesIO(data),
        }
        if self.cookies:
            environ["HTTP_COOKIE"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        captured: dict = {}

        def start_response(status: str, response_headers: list) -> None:
            captured["status"] = int(status.split()[0])
            captured["headers"] = response_headers

        body = b"".join(self.app(environ, start_response))
        page = Page(captured["status"], captured["headers"], body.decode())
        for value in page.cookies_set():
            name, _, rest = value.partition("=")
            cookie_value = rest.split(";", 1)[0]
            if "Max-Age=0" in value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = cookie_value
        return page

    def get(self, target: str, **kwargs) -> Page:
        return self.request("GET", target, **kwargs)

    def post(self, target: str, form: dict | list | None = None, **kwargs) -> Page:
        return self.request("POST", target, form, **kwargs)

    def sign_in(self, username: str, password: str) -> Page:
        form_page = self.get("/sign-in")
        return self.post(
            "/sign-in",
            {"csrf_token": form_page.csrf_token, "username": username, "password": password},
        )
