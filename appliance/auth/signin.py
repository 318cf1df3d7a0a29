"""Turning credentials into a Principal: passwords, personal access, deploy and refresh tokens.

Checking an argon2id hash costs tens of milliseconds on purpose, far more than signing a
token; docker and CI clients send the same credentials for every request. So each worker
remembers verified passwords for a short time, keyed by a keyed digest (never the
password itself). The user's row is read on every request anyway (blocked? admin?), and
carries `credentials_version`, which every password change, block or unblock increments:
a cached entry only counts while its version equals the row's, so invalidation reaches
every worker process at its very next request, at the cost of no extra query.

Failed sign-ins are counted in the shared database for three subjects: the username from
this client address, the client address, and the username from anywhere. Past a subject's
limit the answer is 429 with Retry-After until the window ends, for every request that
subject covers: the limit is checked before the cache and before any password work, so a
right guess is answered exactly like a wrong one and a locked guesser learns nothing (a
cache hit answered before the limit was a password oracle). Counting per (username,
address) first is what keeps the real user's client working while someone at another
address hammers its username; only failures from many addresses lock the account itself.
A success never clears a count: the owner's own retries cannot reopen a closed window.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from appliance.auth import credentials
from appliance.auth.config import AuthConfig
from appliance.auth.permissions import ANONYMOUS_PRINCIPAL, DEPLOY_TOKEN, USER, Principal
from appliance.auth.store import DeployToken, Store, User

BAD_CREDENTIALS = "Invalid username or password (or personal access / deploy token)."


class SignInRefused(Exception):
    """The request's credentials are not accepted; becomes a 401 or 429 response."""

    def __init__(self, status: int, message: str, reason: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.retry_after = (
            status,
            message,
            reason,
            retry_after,
        )


@dataclass(frozen=True)
class SignedIn:
    principal: Principal
    via: str
    """password, personal_access_token, deploy_token, refresh_token or anonymous"""
    credentials_version: int = 0
    personal_access_token_id: int | None = None
    deploy_token_id: int | None = None


ANONYMOUS = SignedIn(ANONYMOUS_PRINCIPAL, "anonymous")


class CredentialCache:
    """A bounded LRU of recently verified passwords: digest -> (user id, version, expiry)."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[bytes, tuple[int, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._key = os.urandom(32)  # per process: the digests mean nothing elsewhere

    def digest(self, username: str, password: str) -> bytes:
        message = username.encode() + b"\0" + password.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def holds(self, digest: bytes, user_id: int, version: int, now: float) -> bool:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return False
            if entry[0] != user_id or entry[1] != version or entry[2] <= now:
                del self._entries[digest]
                return False
            self._entries.move_to_end(digest)
            return True

    def remember(self, digest: bytes, user_id: int, version: int, now: float) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        with self._lock:
            self._entries[digest] = (user_id, version, now + self.ttl)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


class Authenticator:
    def __init__(self, store: Store, config: AuthConfig) -> None:
        self.store, self.config = store, config
        self.cache = CredentialCache(config.credential_cache_ttl, config.credential_cache_size)

    # -- sign-in with Basic credentials or the OAuth2 password grant ------------------
    def sign_in(self, username: str, password: str, address: str, now: float) -> SignedIn:
        if not username or not password:
            raise SignInRefused(401, BAD_CREDENTIALS, "empty username or password")
        if "+" in username:  # no user name can hold '+': it is a deploy token's name
            return self._deploy_token(username, password, address, now)
        if password.startswith(credentials.PERSONAL_TOKEN_PREFIX):
            return self._personal_access_token(username, password, address, now)
        return self._password(username, password, address, now)

    def _password(self, username: str, password: str, address: str, now: float) -> SignedIn:
        self.check_rate(username, address, now)  # before the cache: no answer may differ
        user = self.store.find_user(username)
        digest = self.cache.digest(username, password)
        if (
            user is not None
            and not user.blocked
            and self.cache.holds(digest, user.id, user.credentials_version, now)
        ):
            return SignedIn(_user_principal(user), "password", user.credentials_version)
        if not credentials.verify_password(user.password_hash if user else None, password):
            self.failed(username, address, now)
            raise SignInRefused(
                401, BAD_CREDENTIALS, "unknown user" if user is None else "wrong password"
            )
        if user.blocked:
            raise SignInRefused(
                401, f"The account '{username}' is blocked; ask an administrator.", "user blocked"
            )
        self.cache.remember(digest, user.id, user.credentials_version, now)
        return SignedIn(_user_principal(user), "password", user.credentials_version)

    def _personal_access_token(
        self, username: str, secret: str, address: str, now: float
    ) -> SignedIn:
        self.check_rate(username, address, now)
        token = self.store.find_personal_access_token(credentials.secret_digest(secret))
        user = self.store.find_user_by_id(token.user_id) if token else None
        if token is None or user is None or user.username != username:
            self.failed(username, address, now)
            raise SignInRefused(401, BAD_CREDENTIALS, "unknown personal access token")
        if not token.usable(now):
            self.failed(username, address, now)
            why = "revoked" if token.revoked else "expired"
            raise SignInRefused(
                401, f"The personal access token '{token.name}' is {why}.", f"token {why}"
            )
        if user.blocked:
            raise SignInRefused(
                401, f"The account '{username}' is blocked; ask an administrator.", "user blocked"
            )
        principal = _user_principal(user, token_scopes=token.scopes)
        return SignedIn(
            principal,
            "personal_access_token",
            user.credentials_version,
            personal_access_token_id=token.id,
        )

    def _deploy_token(self, username: str, secret: str, address: str, now: float) -> SignedIn:
        self.check_rate(username, address, now)
        found = self.store.find_deploy_token(username)
        if found is None or not hmac.compare_digest(found[1], credentials.secret_digest(secret)):
            self.failed(username, address, now)
            raise SignInRefused(401, BAD_CREDENTIALS, "wrong deploy token")
        token = found[0]
        if not token.usable(now):
            self.failed(username, address, now)
            why = "revoked" if token.revoked else "expired"
            raise SignInRefused(401, f"The deploy token '{token.name}' is {why}.", f"token {why}")
        return SignedIn(_deploy_principal(token), "deploy_token", deploy_token_id=token.id)

    # -- refresh tokens -----------------------------------------------------------------
    def issue_refresh_token(self, signed_in: SignedIn, client_id: str | None, now: float) -> str:
        secret = credentials.new_secret(credentials.REFRESH_TOKEN_PREFIX)
        self.store.store_refresh_token(
            credentials.secret_digest(secret),
            user_id=signed_in.principal.user_id,
            personal_access_token_id=signed_in.personal_access_token_id,
            deploy_token_id=signed_in.deploy_token_id,
            credentials_version=signed_in.credentials_version,
            client_id=client_id,
            expires_at=int(now) + self.config.refresh_token_lifetime,
            keep=self.config.refresh_tokens_per_user,
        )
        return secret

    def refresh(self, secret: str, address: str, now: float) -> SignedIn:
        """The principal a refresh token stands for. A failure counts against the client
        address like a wrong password: every failure path is limited, so none of them can
        be used to fill the audit log at full speed."""
        self.check_rate(None, address, now)
        try:
            return self._refresh(secret, now)
        except SignInRefused:
            self.failed(None, address, now)
            raise

    def _refresh(self, secret: str, now: float) -> SignedIn:
        invalid = SignInRefused(
            401, "The refresh token is invalid or expired; sign in again.", "bad refresh token"
        )
        stored = self.store.find_refresh_token(credentials.secret_digest(secret or ""))
        if stored is None or stored.expires_at <= now:
            raise invalid
        if stored.deploy_token_id is not None:
            token = self.store.find_deploy_token_by_id(stored.deploy_token_id)
            if token is None or not token.usable(now):
                raise invalid
            return SignedIn(_deploy_principal(token), "refresh_token", deploy_token_id=token.id)
        user = self.store.find_user_by_id(stored.user_id) if stored.user_id else None
        if user is None or user.blocked:
            raise invalid
        if stored.personal_access_token_id is not None:
            token = self.store.personal_access_token(stored.personal_access_token_id)
            if not token.usable(now):
                raise invalid
            return SignedIn(
                _user_principal(user, token_scopes=token.scopes),
                "refresh_token",
                user.credentials_version,
                personal_access_token_id=token.id,
            )
        if user.credentials_version != stored.credentials_version:
            raise invalid  # password changed (or user blocked and unblocked) since sign-in
        return SignedIn(_user_principal(user), "refresh_token", user.credentials_version)

    # -- failed sign-ins ----------------------------------------------------------------
    def _subjects(self, username: str | None, address: str) -> dict[str, int]:
        """The counters a failure adds to, with their limits: the address alone when no
        username was given (a bad refresh token, malformed credentials, a bad request)."""
        subjects = {f"address:{address}": self.config.rate_limit_address_failures}
        if username is not None:
            # 'pair:' first, address before the username: the address holds no space, so
            # no username can make one pair's subject equal another's.
            subjects[f"pair:{address} {username}"] = self.config.rate_limit_user_failures
            subjects[f"user:{username}"] = self.config.rate_limit_account_failures
        return subjects

    def check_rate(self, username: str | None, address: str, now: float) -> None:
        """Refuse with 429 while any counter this request falls under is at its limit."""
        limits = self._subjects(username, address)
        window = self.config.rate_limit_window
        counted = self.store.failed_signins(limits, int(now), window)
        for subject, (failures, start) in counted.items():
            limit = limits[subject]
            if limit and failures >= limit:
                retry_after = max(1, start + window - int(now))
                what = {
                    "pair": "this account from your address",
                    "user": "this account",
                    "address": "your address",
                }[subject.partition(":")[0]]
                raise SignInRefused(
                    429,
                    f"Too many failed sign-ins for {what}; try again in {retry_after} seconds.",
                    f"rate limited ({_bounded_subject(subject)})",
                    retry_after,
                )

    def failed(self, username: str | None, address: str, now: float) -> None:
        """Count one failure; None for requests that name no username."""
        window = self.config.rate_limit_window
        self.store.record_failed_signin(self._subjects(username, address), int(now), window)
        # Guessed usernames must not grow the table forever: drop finished windows.
        self.store.forget_failed_signins(before=int(now) - window)


def _bounded_subject(subject: str) -> str:
    """A subject as the audit log shows it: a guessed username may be any length."""
    return subject if len(subject) <= 200 else subject[:200] + "...[truncated]"


def _user_principal(user: User, token_scopes: frozenset[str] | None = None) -> Principal:
    return Principal(
        kind=USER,
        name=user.username,
        user_id=user.id,
        admin=user.admin,
        token_scopes=token_scopes,
    )


def _deploy_principal(token: DeployToken) -> Principal:
    return Principal(
        kind=DEPLOY_TOKEN,
        name=token.username,
        token_scopes=token.scopes,
        project_id=token.project_id,
    )
