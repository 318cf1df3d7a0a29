"""A stand-in token issuer for tests that need a token-protected registry.

It follows DESIGN.md's interop facts exactly (ES256, `kid` = libtrust key ID, `x5c`,
`aud` a string) so a registry configured with `signing_certificate_pem()` as its
rootcertbundle accepts its tokens. It grants every requested scope: tests that exercise
the real permission model use the auth service, not this.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key ID distribution 2.8 matches a token's `kid` against."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass
class TokenSigner:
    issuer: str = "appliance-test-issuer"
    service: str = "container_registry"
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )

    def signing_certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def token(self, subject: str, access: list[dict], lifetime: int = 300) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        headers = {
            "kid": libtrust_key_id(self.key.public_key()),
            "x5c": [base64.b64encode(der).decode()],
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers=headers)


def requested_access(scopes: list[str]) -> list[dict]:
    """`repository:NAME:pull,push` scopes as the JWT `access` claim, all granted."""
    access = []
    for scope in scopes:
        kind, rest = scope.split(":", 1)
        name, _, actions = rest.rpartition(":")
        access.append({"type": kind, "name": name, "actions": actions.split(",")})
    return access


class TokenServer:
    """Serves the signer's tokens at `/jwt/auth` on a free loopback port, to anyone."""

    def __init__(self, signer: TokenSigner) -> None:
        self.signer = signer
        handler = self._handler_class()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        signer = self.signer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/-/health":
                    self._reply(200, b"OK")
                    return
                query = urllib.parse.parse_qs(url.query)
                token = signer.token(
                    query.get("account", ["anonymous"])[0],
                    requested_access(query.get("scope", [])),
                )
                body = json.dumps(
                    {"token": token, "access_token": token, "expires_in": 300}
                ).encode()
                self._reply(200, body, "application/json")

            def _reply(self, status: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> TokenServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
