"""Obtain a certificate from an ACME CA (Let's Encrypt, or pebble in tests) over http-01.

A thin client on certbot's `acme` library. It returns the new key and chain as data and
writes nothing but the challenge tokens it serves, so a failed issuance cannot touch the
certificate nginx is serving: the caller decides with `pki.should_renew`, calls
`obtain_certificate`, then writes key and chain atomically and reloads nginx.

Every failure is an `IssuanceError` subclass whose message names the host and says what
to check, because "urn:ietf:params:acme:error:connection" alone sends nobody to look at
their firewall.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import josepy as jose
import requests
from acme import challenges, crypto_util, messages
from acme import client as acme_client
from acme import errors as acme_errors
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from appliance import pki
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

CHALLENGE_DIR = Path(".well-known", "acme-challenge")
USER_AGENT = "appliance-acme"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_NETWORK_TIMEOUT_MAX = 30
_POLL_FIRST, _POLL_MAX = 0.2, 2.0

# ACME problem types (RFC 8555 section 6.7) grouped by what the operator has to fix.
_CHALLENGE_CODES = {"connection", "dns", "unknownHost", "unauthorized", "incorrectResponse", "tls"}
_IDENTIFIER_CODES = {"rejectedIdentifier", "unsupportedIdentifier"}
_CONTACT_CODES = {"invalidContact", "invalidEmail", "unsupportedContact"}


class IssuanceError(ApplianceError):
    """No certificate was issued; the current one (if any) stays in place."""


class DirectoryUnreachable(IssuanceError):
    """The ACME server could not be reached or did not answer as an ACME server."""


class ChallengeFailed(IssuanceError):
    """The CA could not fetch the http-01 token from this host."""


class CAAForbidden(IssuanceError):
    """A DNS CAA record forbids this CA from issuing for the host."""


class RateLimited(IssuanceError):
    """The CA refuses more orders for now."""


class IdentifierRejected(IssuanceError):
    """The CA will not issue for this name at all (policy, IP address, blocked name)."""


class AccountRejected(IssuanceError):
    """The CA refused the account: contact address, terms, external account binding."""


class DeadlineExceeded(IssuanceError):
    """The order did not complete in the allotted time."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A new private key and the chain for it (leaf first), ready to be written."""

    key_pem: bytes
    fullchain_pem: bytes
    account_url: str
    account_created: bool


def generate_account_key() -> bytes:
    """An ACME account key: RSA 2048, which every ACME CA accepts (RS256)."""
    return pki.generate_private_key("rsa-2048")


def obtain_certificate(
    domains: list[str],
    *,
    directory_url: str,
    account_key_pem: bytes,
    webroot: Path,
    contact_emails: list[str],
    ca_bundle: str | None,
    key_type: str,
    deadline_seconds: float = 90,
) -> IssuedCertificate:
    """Order one certificate for all `domains` (first = CN), proving each over http-01.

    The account is looked up by its key and created (agreeing to the CA's terms) only
    if the CA does not know it. Tokens are served from `webroot/.well-known/
    acme-challenge/` for as long as the authorizations are pending and removed after,
    also on failure. Polling gives up `deadline_seconds` after the call, and no single
    request waits longer than that either.
    """
    domains = list(dict.fromkeys(name.strip().rstrip(".").lower() for name in domains))
    _refuse_names_http01_cannot_prove(domains)
    started = time.monotonic()
    deadline = started + deadline_seconds
    jwk, algorithm = account_jwk(account_key_pem)
    network = acme_client.ClientNetwork(
        jwk,
        alg=algorithm,
        verify_ssl=ca_bundle if ca_bundle else True,
        user_agent=USER_AGENT,
        timeout=max(1, min(_NETWORK_TIMEOUT_MAX, int(deadline_seconds))),
    )
    hosts = ", ".join(domains)
    key_pem = pki.generate_private_key(key_type)  # a bad key type fails before any request
    try:
        client = _connect(directory_url, network, hosts, ca_bundle)
        with _translated_errors(hosts, deadline_seconds):
            account_url, created = _account(client, contact_emails)
            order = client.new_order(crypto_util.make_csr(key_pem, domains))
            log.info("order %s for %s", order.uri, hosts)
            with _ChallengeFiles(Path(webroot)) as challenge_files:
                pending = _answer_challenges(client, order, jwk, challenge_files)
                order = order.update(
                    authorizations=_wait_for_authorizations(client, pending, order, deadline)
                )
            order = client.finalize_order(order, _acme_deadline(deadline))
    finally:
        network.session.close()
    fullchain = order.fullchain_pem.encode()
    _check_issued(fullchain, key_pem, domains)
    log.info("issued certificate for %s in %.1f s", hosts, time.monotonic() - started)
    return IssuedCertificate(key_pem, fullchain, account_url, created)


# --- steps ---------------------------------------------------------------------------


def _refuse_names_http01_cannot_prove(domains: list[str]) -> None:
    """Fail before contacting the CA (and spending rate limit) for names it must refuse."""
    if not domains:
        raise IssuanceError("A certificate needs at least one host name.")
    for name in domains:
        if pki.is_ip_address(name):
            raise IdentifierRejected(
                f"Let's Encrypt does not issue certificates for the IP address {name}: "
                "use a DNS name, or a self-signed or own certificate for this host."
            )
        if "*" in name:
            raise IdentifierRejected(
                f"A wildcard name ({name}) cannot be validated over http-01: configure the "
                "wildcard certificate and key as files instead of Let's Encrypt."
            )


def account_jwk(account_key_pem: bytes) -> tuple[jose.JWK, jose.JWASignature]:
    """The account key as the acme library signs with it: JWK and JWS algorithm."""
    try:
        key = serialization.load_pem_private_key(account_key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise IssuanceError(
            "The ACME account key is not a readable unencrypted PEM private key."
        ) from error
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return jose.JWKEC(key=key), jose.ES256
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return jose.JWKEC(key=key), jose.ES384
    raise IssuanceError("The ACME account key must be RSA or EC P-256/P-384.")


def _connect(
    directory_url: str, network: acme_client.ClientNetwork, hosts: str, ca_bundle: str | None
) -> acme_client.ClientV2:
    try:
        directory = acme_client.ClientV2.get_directory(directory_url, network)
    except requests.exceptions.SSLError as error:
        trust = f"the CA bundle {ca_bundle}" if ca_bundle else "the system CA store"
        raise DirectoryUnreachable(
            f"Cannot verify the TLS certificate of the ACME server {directory_url} "
            f"against {trust} (needed for {hosts}): {_reason(error)}."
        ) from error
    except (requests.exceptions.RequestException, acme_errors.Error, ValueError) as error:
        raise DirectoryUnreachable(
            f"Cannot reach the ACME directory {directory_url} (needed for {hosts}): "
            f"{_reason(error)}. Check the directory URL and that this host can make "
            "outbound HTTPS connections (proxy, firewall)."
        ) from error
    return acme_client.ClientV2(directory, network)


def _account(client: acme_client.ClientV2, contact_emails: list[str]) -> tuple[str, bool]:
    """Find the account of this key, or register it; keep its contacts as configured."""
    contact = tuple(f"mailto:{email}" for email in contact_emails)
    try:
        account = client.query_registration(
            messages.RegistrationResource(body=messages.Registration())
        )
    except messages.Error as error:
        if error.code != "accountDoesNotExist":
            raise
    else:
        if set(account.body.contact) != set(contact):
            account = client.update_registration(account, messages.Registration(contact=contact))
            log.info("updated contacts of ACME account %s", account.uri)
        log.info("using ACME account %s", account.uri)
        return account.uri, False
    account = client.new_account(
        messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
    )
    log.info("registered ACME account %s", account.uri)
    return account.uri, True


def _answer_challenges(
    client: acme_client.ClientV2,
    order: messages.OrderResource,
    jwk: jose.JWK,
    challenge_files: _ChallengeFiles,
) -> list[messages.AuthorizationResource]:
    """Publish every token first, then tell the CA: it may validate at once."""
    to_answer = []
    for authorization in order.authorizations:
        if authorization.body.status == messages.STATUS_VALID:
            continue  # reused from an earlier order
        host = authorization.body.identifier.value
        http01 = [
            c for c in authorization.body.challenges if isinstance(c.chall, challenges.HTTP01)
        ]
        if not http01:
            raise ChallengeFailed(
                f"The ACME server offers no http-01 challenge for {host}; this appliance "
                "validates names over http-01 only."
            )
        response, validation = http01[0].response_and_validation(jwk)
        challenge_files.publish(http01[0].chall.encode("token"), validation)
        to_answer.append((http01[0], response))
    for challenge, response in to_answer:
        client.answer_challenge(challenge, response)
    return list(order.authorizations)


def _wait_for_authorizations(
    client: acme_client.ClientV2,
    authorizations: list[messages.AuthorizationResource],
    order: messages.OrderResource,
    deadline: float,
) -> list[messages.AuthorizationResource]:
    """Poll until no authorization is pending; fast at first (pebble, LE both answer in
    about a second), backing off to `_POLL_MAX` so a slow CA is not hammered."""
    done = []
    delay = _POLL_FIRST
    for authorization in authorizations:
        while authorization.body.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
            if time.monotonic() + delay > deadline:
                raise acme_errors.TimeoutError()
            time.sleep(delay)
            delay = min(delay * 1.5, _POLL_MAX)
            authorization, _ = client.poll(authorization)
        if authorization.body.status != messages.STATUS_VALID:
            raise acme_errors.ValidationError([authorization])
        done.append(authorization)
    return done


def _check_issued(fullchain_pem: bytes, key_pem: bytes, domains: list[str]) -> None:
    """Refuse to hand back a chain nginx would reject or that misses a name."""
    try:
        matches = pki.public_key_matches(fullchain_pem, key_pem)
        info = pki.certificate_info(fullchain_pem)
    except pki.CertificateError as error:
        raise IssuanceError(f"The ACME server returned an unusable certificate: {error}") from None
    missing = [host for host in domains if not pki.covers(info, host)]
    if not matches or missing:
        raise IssuanceError(
            "The ACME server returned a certificate that does not match the order "
            f"(key matches: {matches}; names missing: {', '.join(missing) or 'none'})."
        )


# --- challenge tokens ------------------------------------------------------------------


class _ChallengeFiles:
    """The token files of one order in the webroot; removes exactly those on exit.

    Directories it had to create are removed again if empty, so a webroot that another
    process (nginx) serves is left as it was found.
    """

    def __init__(self, webroot: Path) -> None:
        self.directory = webroot / CHALLENGE_DIR
        self._created_files: list[Path] = []
        self._created_dirs: list[Path] = []

    def __enter__(self) -> _ChallengeFiles:
        missing = []
        path = self.directory
        while not path.exists():
            missing.append(path)
            path = path.parent
        for path in reversed(missing):
            path.mkdir(mode=0o755)
            self._created_dirs.append(path)
        return self

    def publish(self, token: str, validation: str) -> None:
        if not _TOKEN.match(token):
            raise IssuanceError(f"The ACME server sent an invalid challenge token {token!r}.")
        target = self.directory / token
        descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=".token-")
        try:
            with os.fdopen(descriptor, "w") as stream:
                stream.write(validation)
            os.chmod(temporary, 0o644)  # nginx runs as another user than the renewer
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._created_files.append(target)

    def __exit__(self, *exc_info: object) -> None:
        for path in self._created_files:
            path.unlink(missing_ok=True)
        for path in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                path.rmdir()


# --- errors ----------------------------------------------------------------------------


@contextlib.contextmanager
def _translated_errors(hosts: str, deadline_seconds: float) -> Iterator[None]:
    """Turn the acme library's and the network's exceptions into one clear sentence."""
    try:
        yield
    except acme_errors.ValidationError as error:
        raise _validation_error(error) from None
    except acme_errors.TimeoutError:
        raise DeadlineExceeded(
            f"No certificate for {hosts} within {deadline_seconds:g} s: the ACME server "
            "had not finished validating. Check that port 80 of each name answers "
            "promptly (a firewall that drops instead of rejecting looks like this), "
            "then retry."
        ) from None
    except acme_errors.IssuanceError as error:
        raise error_for_problem(error.error, hosts) from None
    except messages.Error as error:
        raise error_for_problem(error, hosts) from None
    except requests.exceptions.RequestException as error:
        raise DirectoryUnreachable(
            f"Lost the connection to the ACME server while ordering for {hosts}: {_reason(error)}."
        ) from None
    except acme_errors.Error as error:
        raise IssuanceError(f"The ACME order for {hosts} failed: {error}.") from None


def _validation_error(error: acme_errors.ValidationError) -> IssuanceError:
    first: IssuanceError | None = None
    sentences = []
    for authorization in error.failed_authzrs:
        host = authorization.body.identifier.value
        problems = [c.error for c in authorization.body.challenges if c.error is not None]
        problem = problems[0] if problems else messages.Error(detail="no reason given")
        exception = error_for_problem(problem, host)
        sentences.append(str(exception))
        first = first or exception
    assert first is not None
    return type(first)(" ".join(sentences))


def error_for_problem(problem: messages.Error, host: str) -> IssuanceError:
    """One sentence per ACME problem type (RFC 8555 6.7), saying what to look at."""
    code = problem.code
    detail = (problem.detail or problem.description or problem.typ or "").strip().rstrip(".")
    if problem.identifier is not None:
        host = problem.identifier.value
    if code in _CHALLENGE_CODES:
        return ChallengeFailed(
            f"The CA could not validate {host}: {detail}. Check that {host} resolves (DNS "
            f"A/AAAA records) to this host, that port 80 is reachable from the internet, "
            f"and that http://{host}/.well-known/acme-challenge/ is served from the "
            "appliance's ACME webroot (no redirect or other proxy in front)."
        )
    if code == "caa":
        return CAAForbidden(
            f"The DNS CAA records of {host} forbid this CA from issuing: {detail}. Add a "
            'CAA record allowing it (for Let\'s Encrypt: 0 issue "letsencrypt.org") or '
            "remove the restriction."
        )
    if code == "rateLimited":
        return RateLimited(
            f"The CA rate-limited the order for {host}: {detail}. Wait before retrying "
            "(the renewer retries on its own schedule); use the staging directory for tests."
        )
    if code in _IDENTIFIER_CODES:
        return IdentifierRejected(
            f"The CA will not issue a certificate for {host}: {detail}. Use a public DNS "
            "name (no IP address, no internal-only name) or configure your own certificate."
        )
    if code in _CONTACT_CODES:
        return AccountRejected(
            f"The CA refused the account contact address: {detail}. Check "
            "letsencrypt.contact_emails."
        )
    if code == "externalAccountRequired":
        return AccountRejected(
            "The ACME server requires external account binding, which this appliance "
            f"does not support (needed for {host}): {detail}."
        )
    return IssuanceError(f"The ACME server refused the order for {host}: {detail}.")


def _reason(error: BaseException) -> str:
    """The operating system's reason when there is one ("Connection refused"), not the
    three nested exception reprs requests wraps it in."""
    text = str(error) or type(error).__name__
    found = _ERRNO.search(text)
    return found.group(1) if found else text.rstrip(".")


def _acme_deadline(deadline: float) -> dt.datetime:
    """The acme library compares deadlines with naive local `datetime.now()`."""
    return dt.datetime.now() + dt.timedelta(seconds=max(0.0, deadline - time.monotonic()))
