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


class TokenVerifier:
    """Checks registry tokens as the registry does (signature by a trusted certificate's
    key, issuer, audience, time with the registry's 60 s leeway) and returns their claims.

    The tag rules use it to learn who pushes: the registry would refuse the request of
    an invalid token anyway, so such a request is passed on without a rule applied, and
    a forged subject never earns a protected tag's role.
    """

    LEEWAY = 60

    def __init__(self, certificate_path: Path | str, issuer: str, service: str) -> None:
        self.issuer, self.service = issuer, service
        try:
            certificates = x509.load_pem_x509_certificates(Path(certificate_path).read_bytes())
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"Cannot read the token-signing certificate {certificate_path}: {error}."
            ) from error
        self._keys = {libtrust_key_id(c.public_key()): c.public_key() for c in certificates}

    def claims(self, token: str, now: float) -> dict | None:
        """The claims of a valid token; None for anything the registry would refuse."""
        try:
            header_segment, payload_segment, signature_segment = token.split(".")
            header = json.loads(_b64decode(header_segment))
            claims = json.loads(_b64decode(payload_segment))
            signature = _b64decode(signature_segment)
        except (ValueError, TypeError):
            return None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return None
        keys = (
            [self._keys[header["kid"]]] if header.get("kid") in self._keys else self._keys.values()
        )
        signed = f"{header_segment}.{payload_segment}".encode()
        if not any(_verified(key, header.get("alg"), signed, signature) for key in keys):
            return None
        if claims.get("iss") != self.issuer or claims.get("aud") != self.service:
            return None
        try:
            expires, not_before = int(claims["exp"]), int(claims.get("nbf", 0))
        except (KeyError, TypeError, ValueError):
            return None
        if expires + self.LEEWAY < now or not_before - self.LEEWAY > now:
            return None
        return claims


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _verified(key: object, algorithm: object, signed: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    try:
        if algorithm == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 64:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
            return True
        if algorithm == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
            return True
    except InvalidSignature:
        return False
    return False
