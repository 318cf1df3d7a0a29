"""appliance-secrets.json: generated once, reused forever, never printed.

Harbor regenerates its secrets on every run and so invalidates every token and session;
here a value is generated only when it is missing, and the file is written only when
something was added. The token-signing certificate is kept beside its key so the
registry's rootcertbundle is the same bytes run after run; it is regenerated only when
the key it certifies changes (an admin-supplied `registry.internal_key`), so the key
and the bundle cannot disagree after a reconfigure.
"""

from __future__ import annotations

import hashlib
import json
import secrets as random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.settings import Settings


@dataclass(frozen=True)
class Secrets:
    token_signing_key: str
    token_signing_certificate: str
    registry_http_secret: str
    auth_secret: str
    letsencrypt_account_key: str
    # SHA-256 of key PEM + certificate PEM as last verified to agree: a no-op run then
    # knows the pair agrees without loading cryptography, and any edit of either side
    # (by hand, or a new internal_key) sends it through the real check again.
    token_signing_pair_digest: str = ""
    # What the registry sends with its events to the auth service (Authorization: Bearer);
    # the auth service's config holds only its SHA-256.
    registry_events_secret: str = ""

    def private_values(self) -> list[str]:
        """The values that must never be printed (the certificate and digest are public)."""
        return [
            self.token_signing_key,
            self.registry_http_secret,
            self.auth_secret,
            self.letsencrypt_account_key,
            *([self.registry_events_secret] if self.registry_events_secret else []),
        ]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: cannot read the secrets file ({exc}); restore it from a "
            f"backup - deleting it would invalidate every issued token."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the secrets file is not a JSON object; restore it from a backup."
        )
    damaged = sorted(str(k) for k, v in data.items() if not isinstance(v, str))
    if damaged:
        raise ConfigError(
            f"{path}: {', '.join(damaged)} should be a string; restore the "
            f"secrets file from a backup."
        )
    return data


def pair_digest(key: str, cert: str) -> str:
    return hashlib.sha256((key + "\0" + cert).encode()).hexdigest()


def load_or_generate(
    path: Path,
    internal_key: str | None = None,
    key_type: str = "ec-p256",
    issuer: str = "appliance-issuer",
) -> Secrets:
    """The secrets to use: what the file holds, plus whatever is missing, generated."""
    stored = read(path)
    key = internal_key or stored.get("token_signing_key")
    if not key:
        from appliance import pki

        key = pki.generate_private_key(key_type).decode()
    cert = stored.get("token_signing_certificate")
    if cert and stored.get("token_signing_pair_digest") == pair_digest(key, cert):
        matches = True
    else:
        from appliance import pki

        try:
            matches = bool(cert) and pki.public_key_matches(cert.encode(), key.encode())
        except pki.CertificateError:
            matches = False  # an unreadable certificate is made again below; a bad key not
    if not matches:
        from appliance import pki

        try:
            cert = pki.signing_certificate(key.encode(), issuer).decode()
        except pki.CertificateError:
            if internal_key:
                raise ConfigError(
                    "registry.internal_key: not a readable unencrypted PEM private key (RSA or EC)."
                ) from None
            raise ConfigError(
                f"{path}: token_signing_key is not a readable PEM private key; "
                f"restore the secrets file from a backup - a new key would "
                f"invalidate every issued token."
            ) from None
    account_key = stored.get("letsencrypt_account_key")
    if not account_key:
        from appliance.letsencrypt import generate_account_key

        account_key = generate_account_key().decode()
    return Secrets(
        token_signing_key=key,
        token_signing_certificate=cert,
        registry_http_secret=stored.get("registry_http_secret") or random.token_hex(32),
        auth_secret=stored.get("auth_secret") or random.token_hex(32),
        letsencrypt_account_key=account_key,
        token_signing_pair_digest=pair_digest(key, cert),
        registry_events_secret=stored.get("registry_events_secret") or random.token_hex(32),
    )


def for_settings(settings: Settings) -> Secrets:
    """The secrets a run of reconfigure or renew-certs uses for these settings."""
    r = settings.registry
    return load_or_generate(settings.paths.secrets_file, r.internal_key, r.token_key_type, r.issuer)
