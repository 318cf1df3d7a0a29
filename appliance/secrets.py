"""appliance-secrets.json: generated once, reused forever, never printed.

Harbor regenerates its secrets on every run and so invalidates every token and session;
here a value is generated only when it is missing, and the file is written only when
something was added. The token-signing certificate is kept beside its key so the
registry's rootcertbundle is the same bytes run after run; it is regenerated only when
the key it certifies changes (an admin-supplied `registry.internal_key`), so the key
and the bundle cannot disagree after a reconfigure.

Signing-key rotation (`appliance-ctl rotate-token-key`) moves the file through three
states, each one safe to stop in (the registry trusts every certificate of
`trusted_certificates()`, the auth service signs with `token_signing_key` alone):

  steady      key K1                      bundle: K1
  rotating    key K1, next K2             bundle: K1 + K2   (registry first, auth still K1)
  rotated     key K2, previous K1 until T bundle: K1 + K2   (auth signs with K2)

and back to steady (bundle: K2) once T has passed: the first load after T forgets the
previous certificate, so the first reconfigure after T writes the file and the bundle
without it. T is when the last token K1 signed has expired for the registry too.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets as random
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.settings import Settings


REGISTRY_CLOCK_LEEWAY = 60  # seconds Distribution accepts a token past its exp


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
    # A rotation under way: the registry trusts this key already, the auth service does
    # not sign with it yet (see the module docstring).
    next_token_signing_key: str = ""
    next_token_signing_certificate: str = ""
    # A rotation done: the old key's certificate, trusted until the time (RFC 3339 UTC)
    # after which no token it signed can still be accepted.
    previous_token_signing_certificate: str = ""
    previous_token_signing_trusted_until: str = ""
    # What the registry sends with its events to the auth service (Authorization: Bearer);
    # the auth service's config holds only its SHA-256.
    registry_events_secret: str = ""

    def private_values(self) -> list[str]:
        """The values that must never be printed (the certificate and digest are public)."""
        values = [
            self.token_signing_key,
            self.registry_http_secret,
            self.auth_secret,
            self.letsencrypt_account_key,
            self.registry_events_secret,
            self.next_token_signing_key,
        ]
        return [v for v in values if v]

    def to_json(self) -> str:
        # The rotation fields are written only while they hold something: a file that
        # never saw a rotation keeps the very bytes it always had (a no-op reconfigure
        # after an upgrade changes nothing).
        values = {k: v for k, v in asdict(self).items() if v or k not in ROTATION_FIELDS}
        return json.dumps(values, indent=2, sort_keys=True) + "\n"

    @property
    def rotating(self) -> bool:
        """A rotation was begun and the auth service does not sign with the new key yet."""
        return bool(self.next_token_signing_key)

    @property
    def previous_trusted_until(self) -> float | None:
        """When the previous key stops being trusted (epoch), None without one."""
        if not self.previous_token_signing_certificate:
            return None
        return parse_time(self.previous_token_signing_trusted_until)

    def trusted_certificates(self) -> str:
        """The registry's rootcertbundle, oldest key first: the previous certificate of a
        rotation not finished, the signing one, the next one of a rotation under way. So
        the bundle is the same bytes in the rotating and the rotated state, and the step
        that switches the auth service hands the registry over no second time."""
        certificates = [
            self.previous_token_signing_certificate,
            self.token_signing_certificate,
            self.next_token_signing_certificate,
        ]
        return "".join(c if c.endswith("\n") else c + "\n" for c in certificates if c)


ROTATION_FIELDS = (
    "next_token_signing_key",
    "next_token_signing_certificate",
    "previous_token_signing_certificate",
    "previous_token_signing_trusted_until",
)


def format_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise ConfigError(
            f"previous_token_signing_trusted_until in the secrets file is {text!r}, not a "
            f"time like 2026-01-31T12:00:00Z; correct it or restore the file from a backup."
        ) from None


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
    now: float | None = None,
) -> Secrets:
    """The secrets to use: what the file holds, plus whatever is missing, generated; a
    previous signing certificate whose time has passed is forgotten."""
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
    loaded = Secrets(
        token_signing_key=key,
        token_signing_certificate=cert,
        registry_http_secret=stored.get("registry_http_secret") or random.token_hex(32),
        auth_secret=stored.get("auth_secret") or random.token_hex(32),
        letsencrypt_account_key=account_key,
        token_signing_pair_digest=pair_digest(key, cert),
        registry_events_secret=stored.get("registry_events_secret") or random.token_hex(32),
        **{field: stored.get(field, "") for field in ROTATION_FIELDS},
    )
    until = loaded.previous_trusted_until
    if until is not None and (time.time() if now is None else now) >= until:
        loaded = without_previous(loaded)
    return loaded


def without_previous(secrets: Secrets) -> Secrets:
    return replace(
        secrets, previous_token_signing_certificate="", previous_token_signing_trusted_until=""
    )


def begin_rotation(secrets: Secrets, key_type: str, issuer: str) -> Secrets:
    """The rotating state: a new key beside the current one, trusted but not signing.
    A rotation already under way is resumed with its own new key (an interrupted
    rotate-token-key run again), one that is not finished is refused."""
    if secrets.rotating:
        return secrets
    until = secrets.previous_trusted_until
    if until is not None:
        raise ConfigError(
            f"The previous signing key is still trusted until {format_time(until)} (the "
            f"last rotation is not finished); rotate again after that time, or drop it "
            f"now with appliance-ctl rotate-token-key --finish --force."
        )
    from appliance import pki

    key = pki.generate_private_key(key_type)
    return replace(
        secrets,
        next_token_signing_key=key.decode(),
        next_token_signing_certificate=pki.signing_certificate(key, issuer).decode(),
    )


def trusted_until(now: float, token_lifetime: int, grace: int) -> float:
    """When a token the old key signed at `now` is refused by the registry for sure:
    its lifetime, plus the registry's clock leeway and `grace` (old workers finishing
    their requests), rounded up to the minute the admin is told."""
    return math.ceil((now + token_lifetime + REGISTRY_CLOCK_LEEWAY + grace) / 60) * 60


def complete_rotation(secrets: Secrets, until: float) -> Secrets:
    """The rotated state: the new key signs, the old certificate stays trusted until
    `until`."""
    if not secrets.rotating:
        return secrets
    key, cert = secrets.next_token_signing_key, secrets.next_token_signing_certificate
    return replace(
        secrets,
        token_signing_key=key,
        token_signing_certificate=cert,
        token_signing_pair_digest=pair_digest(key, cert),
        next_token_signing_key="",
        next_token_signing_certificate="",
        previous_token_signing_certificate=secrets.token_signing_certificate,
        previous_token_signing_trusted_until=format_time(until),
    )


def finish_rotation(secrets: Secrets, now: float, force: bool) -> Secrets:
    """The steady state again: the previous certificate dropped (before its time only
    with `force`: tokens it signed are refused from then on)."""
    if secrets.rotating:
        raise ConfigError(
            "A rotation is under way and the token service does not sign with the new key "
            "yet; run appliance-ctl rotate-token-key to complete it first."
        )
    until = secrets.previous_trusted_until
    if until is None:
        raise ConfigError(
            "There is no previous signing key to drop: the registry trusts the current key alone."
        )
    if now < until and not force:
        raise ConfigError(
            f"The previous signing key stays trusted until {format_time(until)}: tokens "
            f"it signed may still be in use; run --finish after that time, or add --force "
            f"to refuse them now."
        )
    return without_previous(secrets)


def for_settings(settings: Settings, now: float | None = None) -> Secrets:
    """The secrets a run of reconfigure or renew-certs uses for these settings (as of
    `now`, by default the present: it decides whether a previous key is forgotten)."""
    r = settings.registry
    return load_or_generate(
        settings.paths.secrets_file, r.internal_key, r.token_key_type, r.issuer, now=now
    )
