"""HTTP/1.1 over a unix socket, as nginx talks to a service listening on one (the token
service with auth.listen_network: unix). urllib speaks TCP only."""

from __future__ import annotations

import http.client
import socket


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def get(socket_path: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One GET on the socket: the status and the body."""
    connection = UnixHTTPConnection(socket_path)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
