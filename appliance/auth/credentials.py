"""Password hashing and token secrets.

Passwords are low-entropy, so they get argon2id (slow on purpose). Personal access,
deploy and refresh tokens are 256-bit random secrets generated here, so a single SHA-256
is a sufficient and cheap stored form: it can be looked up by index and never needs a
cache.
"""

from __future__ import annotations

import functools
import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from appliance.errors import AuthError

MIN_PASSWORD_LENGTH = 8
PERSONAL_TOKEN_PREFIX = "apat_"
DEPLOY_TOKEN_PREFIX = "adt_"
REFRESH_TOKEN_PREFIX = "art_"

# argon2-cffi's defaults are RFC 9106's low-memory profile (t=3, m=64 MiB, p=4).
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username is unknown, so both failures cost the same time.

    Made on first use, not at import: an argon2 hash costs ~100 ms, and every
    appliance-ctl command imports this module.
    """
    return _hasher.hash("appliance-dummy-password")


class WeakPasswordError(AuthError):
    """A new password is too short to be allowed."""


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPasswordError(
            f"The password is too short: use at least {MIN_PASSWORD_LENGTH} characters."
        )
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def new_secret(prefix: str) -> str:
    """A token shown once to its owner; the prefix says what kind of credential it is."""
    return prefix + secrets.token_urlsafe(32)


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
