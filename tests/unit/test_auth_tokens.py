"""Registry tokens: the header (alg, libtrust kid, x5c) and the claims DESIGN.md lists."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.auth.tokens import TokenSigner, libtrust_key_id
from appliance.errors import ConfigError
from tests.support.auth_server import write_signing_material

# A fixed P-256 key and its libtrust key ID, cross-checked independently with
# `openssl pkey -pubout -outform DER | openssl dgst -sha256 -binary | head -c 30 | base32`.
# (The integration test also has the real registry accept a token carrying only the kid.)
KNOWN_KEY = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg6AySV9t9gUeuvzm0
Ym3jLyQSxCOLKb2xKZN9yFWQDvKhRANCAASdBdCsjINo2RApQ9m6vLhgtBuQSw22
DgbGe0Lw3+uHrBppeoWHU+QSy6TS3VYb6l4xg3vyusEZVDJOtCIoGV92
-----END PRIVATE KEY-----
"""
KNOWN_KID = "73UV:FLLB:PRKZ:RWPC:P6X5:PMBI:5AAJ:CZKC:SFUX:AKJ5:2IXV:Q6YL"


def test_libtrust_key_id_of_a_known_key() -> None:
    key = serialization.load_pem_private_key(KNOWN_KEY, password=None)
    assert libtrust_key_id(key.public_key()) == KNOWN_KID


def _signer(tmp_path: Path, kind: str = "ec", lifetime: int = 300) -> TokenSigner:
    key, cert = write_signing_material(tmp_path, kind)
    return TokenSigner(key, cert, "test-issuer", "container_registry", lifetime)


@pytest.mark.parametrize("kind,alg", [("ec", "ES256"), ("rsa", "RS256")])
def test_header_carries_alg_kid_and_x5c(tmp_path: Path, kind: str, alg: str) -> None:
    signer = _signer(tmp_path, kind)
    token = signer.issue("alice", [], now=1_800_000_000).token
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg
    assert header["typ"] == "JWT"
    certificate = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    assert certificate == x509.load_pem_x509_certificate(
        (tmp_path / f"token-{kind}.crt").read_bytes()
    )
    assert header["kid"] == libtrust_key_id(certificate.public_key())
    assert len(header["kid"]) == 59 and header["kid"].count(":") == 11


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_claims_verify_with_the_certificate_key(tmp_path: Path, kind: str) -> None:
    signer = _signer(tmp_path, kind, lifetime=600)
    access = [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    issued = signer.issue("alice", access, now=1_800_000_000)
    certificate = x509.load_pem_x509_certificate((tmp_path / f"token-{kind}.crt").read_bytes())
    claims = jwt.decode(
        issued.token,
        certificate.public_key(),
        algorithms=[signer.algorithm],
        audience="container_registry",
        issuer="test-issuer",
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert claims["sub"] == "alice"
    assert claims["aud"] == "container_registry"  # a string: 2.8 rejects a list
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (
        1_800_000_000,
        1_800_000_000,
        1_800_000_600,
    )
    assert all(isinstance(claims[k], int) for k in ("iat", "nbf", "exp"))
    assert claims["access"] == access
    assert issued.expires_in == 600 and issued.issued_at == 1_800_000_000
    payload = json.loads(base64.urlsafe_b64decode(issued.token.split(".")[1] + "=="))
    assert set(payload) == {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "access"}


def test_every_token_has_its_own_jti(tmp_path: Path) -> None:
    signer = _signer(tmp_path)
    ids = {
        jwt.decode(signer.issue("a", [], 0).token, options={"verify_signature": False})["jti"]
        for _ in range(50)
    }
    assert len(ids) == 50


def test_a_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    key, _ = write_signing_material(tmp_path / "one", "ec")
    _, other_cert = write_signing_material(tmp_path / "two", "ec")
    with pytest.raises(ConfigError, match="No certificate in .* matches the token-signing key"):
        TokenSigner(key, other_cert, "i", "s", 300)


@pytest.mark.parametrize("position", ["first", "second"])
def test_the_keys_certificate_in_a_bundle_is_the_x5c(tmp_path: Path, position: str) -> None:
    # A key rotation's bundle holds the previous key's certificate first.
    key, cert = write_signing_material(tmp_path / "new", "ec")
    _, old_cert = write_signing_material(tmp_path / "old", "rsa")
    bundle = tmp_path / "bundle.crt"
    pems = [cert.read_bytes(), old_cert.read_bytes()]
    bundle.write_bytes(b"".join(pems if position == "first" else pems[::-1]))
    signer = TokenSigner(key, bundle, "i", "s", 300)
    header = jwt.get_unverified_header(signer.issue("a", [], 0).token)
    assert len(header["x5c"]) == 1
    assert (
        header["x5c"][0]
        == base64.b64encode(
            x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
                serialization.Encoding.DER
            )
        ).decode()
    )


def test_unsupported_curve_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    key_path = tmp_path / "p384.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="P-256"):
        TokenSigner(key_path, tmp_path / "unused.crt", "i", "s", 300)
