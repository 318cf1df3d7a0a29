"""Registry tokens: JWTs signed with the appliance's token-signing key.

The header carries both the libtrust key ID (`kid`, what distribution 2.8 looks up in its
rootcertbundle) and `x5c` (the signing certificate, what distribution 3.x requires). The
header never changes for a key, so it is encoded once; per token only the claims are
serialised and signed, straight with `cryptography` (ES256 on P-256 costs ~0.1 ms,
RS256-2048 ~1 ms: the key type sets the token ceiling).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from appliance.errors import ConfigError


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> str:
    """libtrust's key ID: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits in
    base32, as 12 colon-separated groups of 4 characters."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(encoded[i : i + 4] for i in range(0, 48, 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: int


class TokenSigner:
    """Signs registry tokens with one key; loaded once per process."""

    def __init__(
        self,
        key_path: Path | str,
        certificate_path: Path | str,
        issuer: str,
        service: str,
        lifetime: int,
        pem: tuple[bytes, bytes] | None = None,
    ) -> None:
        """From the key and certificate files (the auth service), or from `pem` (their
        contents, as the secrets file holds them: the CLI's own admin tokens)."""
        self.issuer, self.service, self.lifetime = issuer, service, lifetime
        try:
            key_pem = pem[0] if pem else Path(key_path).read_bytes()
            key = serialization.load_pem_private_key(key_pem, password=None)
        except OSError as error:
            raise ConfigError(
                f"Cannot read the token-signing key {key_path}: {error.strerror}."
            ) from error
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"The token-signing key {key_path} is not an unencrypted PEM private key."
            ) from error
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise ConfigError(
                    f"The token-signing key {key_path} uses curve {key.curve.name};"
                    " the registry needs P-256 (prime256v1) for ES256."
                )
            self.algorithm = "ES256"
        elif isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "RS256"
        else:
            raise ConfigError(f"The token-signing key {key_path} must be an EC P-256 or RSA key.")
        try:
            certificates = x509.load_pem_x509_certificates(
                pem[1] if pem else Path(certificate_path).read_bytes()
            )
        except OSError as error:
            raise ConfigError(
                f"Cannot read the token-signing certificate {certificate_path}: {error.strerror}."
            ) from error
        except ValueError as error:
            raise ConfigError(
                f"The token-signing certificate {certificate_path} holds no PEM certificate."
            ) from error
        # The file may hold several certificates (the bundle of a key rotation): the one
        # of this key is what tokens carry as x5c.
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        public = key.public_key().public_bytes(der, spki)
        matching = [c for c in certificates if c.public_key().public_bytes(der, spki) == public]
        if not matching:
            raise ConfigError(
                f"No certificate in {certificate_path} matches the token-signing key {key_path}."
            )
        first = matching[0]
        self._key = key
        self.key_id = libtrust_key_id(key.public_key())
        header = {
            "typ": "JWT",
            "alg": self.algorithm,
            "kid": self.key_id,
            "x5c": [base64.b64encode(first.public_bytes(serialization.Encoding.DER)).decode()],
        }
        self._header_segment = _b64url(json.dumps(header, separators=(",", ":")).encode())

    def issue(self, subject: str, access: list[dict], now: float) -> IssuedToken:
        issued_at = int(now)
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,  # a string: distribution 2.8 rejects a list
            "exp": issued_at + self.lifetime,
            "nbf": issued_at,
            "iat": issued_at,
            "jti": os.urandom(16).hex(),
            "access": access,
        }
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{self._header_segment}.{payload}".encode()
        return IssuedToken(
            f"{self._header_segment}.{payload}.{_b64url(self._sign(signing_input))}",
            self.lifetime,
            issued_at,
        )

    def _sign(self, data: bytes) -> bytes:
        if self.algorithm == "ES256":
            r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
