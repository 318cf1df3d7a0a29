"""The pages' sessions and CSRF tokens: what a cookie holds and when a form counts.

A session is a random secret in a cookie; the database keeps only its SHA-256
(store.web_sessions), bound to the user's `credentials_version`, so a password change, a
block or an unblock ends every session of that user at its next request (the same rule
as refresh tokens). Sessions also end after IDLE_SECONDS without a request and
MAX_SECONDS after sign-in, and at sign-out (the row is deleted).

The cookie is `__Host-` prefixed (the browser keeps it only from HTTPS, for this host
alone, path /), HttpOnly (no script reads it) and SameSite=Lax: a link to a tag page
pasted in a chat opens signed in, while a cross-site POST arrives without the cookie.
Strict would also drop the cookie on those top-level links (the user would see the
sign-in page although signed in) and adds nothing for POSTs, which are refused without
the form's CSRF token anyway.

CSRF: every form carries a token (the synchronizer pattern): the session's own random
token once signed in; before, the sign-in form's token, which a short-lived cookie
holds (double submit), so a third-party page cannot sign a browser in to an account
of its choosing either. A POST whose browser says it came from another site
(Sec-Fetch-Site, Origin) is refused before its token is even looked at.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

SESSION_COOKIE = "__Host-appliance-session"
SIGN_IN_COOKIE = "__Host-appliance-sign-in"
IDLE_SECONDS = 8 * 3600
"""A session ends after this long without a request."""
MAX_SECONDS = 7 * 24 * 3600
"""A session ends this long after sign-in, however busy."""
TOUCH_EVERY = 60
"""Seconds between two writes of a session's last use (not one write per page)."""
SESSIONS_PER_USER = 20
"""Live sessions kept per user; the oldest is dropped first."""
SIGN_IN_COOKIE_SECONDS = 3600


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def expiry(created_at: int, now: int) -> int:
    """When a session used at `now` ends: idle timeout, capped by the absolute one."""
    return min(created_at + MAX_SECONDS, now + IDLE_SECONDS)


def cookie(name: str, value: str, max_age: int) -> str:
    """A Set-Cookie value; max_age 0 removes the cookie."""
    return f"{name}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax"


def read_cookies(header: str) -> dict[str, str]:
    """The request's cookies; a name sent twice keeps its first value."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def token_matches(sent: str | None, expected: str | None) -> bool:
    return bool(sent) and bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


def cross_site(environ: dict) -> str:
    """Why a state-changing request looks cross-site ('' when it does not): the
    browser's own Sec-Fetch-Site, or an Origin naming another host than the request's."""
    fetch_site = environ.get("HTTP_SEC_FETCH_SITE", "")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {fetch_site}"
    origin = environ.get("HTTP_ORIGIN", "")
    if origin and origin != "null":
        if urlsplit(origin).netloc != environ.get("HTTP_HOST", ""):
            return f"Origin {origin[:200]} is not this site"
    elif origin == "null":
        return "Origin: null"
    return ""
