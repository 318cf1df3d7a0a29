"""Certificates and keys: generate, inspect, check, and decide when to renew.

Pure functions on PEM bytes, no files and no network, so every TLS decision the
appliance takes (is this certificate usable for this host? is it due for renewal? when
does the renewer wake up next?) can be tested with a table and explained in one sentence.
Callers own the files: they read PEM, call these, and write atomically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import ApplianceError

KEY_TYPES: dict[str, tuple[str, int]] = {
    "ec-p256": ("ec", 256),
    "ec-p384": ("ec", 384),
    "rsa-2048": ("rsa", 2048),
    "rsa-3072": ("rsa", 3072),
    "rsa-4096": ("rsa", 4096),
}
_CURVES = {256: ec.SECP256R1(), 384: ec.SECP384R1()}

# Backdating covers small clock differences between this host and its clients.
_BACKDATE = dt.timedelta(minutes=5)


class CertificateError(ApplianceError):
    """A certificate or key cannot be parsed or used as asked."""


class UnknownKeyType(ApplianceError, ValueError):
    """The configured key type is not one we can generate."""


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator asks about a certificate: for whom, by whom, until when."""

    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    fingerprint_sha256: str
    self_signed: bool

    @property
    def names(self) -> tuple[str, ...]:
        return self.dns_names + self.ip_addresses


def generate_private_key(key_type: str = "ec-p256") -> bytes:
    """A new private key as unencrypted PKCS#8 PEM, the form nginx and acme both read."""
    try:
        family, size = KEY_TYPES[key_type]
    except KeyError:
        raise UnknownKeyType(
            f"Unknown key type {key_type!r}; use one of: {', '.join(KEY_TYPES)}."
        ) from None
    if family == "ec":
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = ec.generate_private_key(_CURVES[size])
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=size)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def self_signed_certificate(
    key_pem: bytes, hostnames: list[str], days: int = 365, now: dt.datetime | None = None
) -> bytes:
    """A host certificate signed by its own key, for hosts with no public name.

    IP literals become IP SANs (clients never match an IP against a DNS SAN). CA:FALSE
    because it identifies a server, not an issuer; clients that pin it still trust it.
    """
    if not hostnames:
        raise CertificateError("A certificate needs at least one host name.")
    return _self_issued(
        key_pem,
        hostnames[0],
        days,
        now,
        [
            (x509.SubjectAlternativeName(_general_names(hostnames)), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )


def signing_certificate(
    key_pem: bytes, common_name: str, days: int = 3650, now: dt.datetime | None = None
) -> bytes:
    """The certificate that publishes the token-signing key to the registry.

    The registry's `rootcertbundle` trusts it as a root (it verifies token `x5c` chains
    against it), so it is a CA certificate with digitalSignature for the tokens.
    """
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return _self_issued(
        key_pem,
        common_name,
        days,
        now,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (usage, True),
        ],
    )


def _self_issued(
    key_pem: bytes,
    common_name: str,
    days: int,
    now: dt.datetime | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> bytes:
    """A certificate its own key signs: subject = issuer = CN, backdated, with the
    given (extension, critical) pairs and a subject key identifier."""
    key = _load_private_key(key_pem)
    start = _utc(now) - _BACKDATE
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def public_key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the key belongs to the leaf (first) certificate, the check nginx fails on.

    Unreadable PEM raises CertificateError (check_certificate reports it instead).
    """
    leaf = _load_chain(cert_pem)[0]
    key = _load_private_key(key_pem)
    return _spki(leaf.public_key()) == _spki(key.public_key())


def certificate_info(cert_pem: bytes) -> CertificateInfo:
    """Facts about the leaf (first) certificate of a PEM file."""
    return _info(_load_chain(cert_pem)[0])


def check_certificate(
    cert_pem: bytes, key_pem: bytes, hostnames: list[str], now: dt.datetime
) -> list[str]:
    """Every reason this certificate and key cannot serve these hosts; empty when usable.

    All problems are reported at once, so an operator fixes them in one round.
    """
    try:
        chain = _load_chain(cert_pem)
    except CertificateError as error:
        return [str(error)]
    leaf = chain[0]
    info = _info(leaf)
    problems = []
    try:
        key = _load_private_key(key_pem)
    except CertificateError as error:
        problems.append(str(error))
    else:
        spki = _spki(key.public_key())
        if spki != _spki(leaf.public_key()):
            problems.append(_mismatch_message(chain, spki, info))
    now = _utc(now)
    if now >= info.not_after:
        problems.append(f"The certificate for {info.subject} expired on {_date(info.not_after)}.")
    elif now < info.not_before:
        problems.append(
            f"The certificate for {info.subject} is not valid before "
            f"{_date(info.not_before)}; check the clock of this host."
        )
    for host in hostnames:
        if not covers(info, host):
            problems.append(
                f"The certificate does not cover {host} (it covers: "
                f"{', '.join(info.names) or 'no names'})."
            )
    return problems


def covers(info: CertificateInfo, host: str) -> bool:
    """RFC 6125 name matching: IPs against IP SANs, wildcards as the whole left label only.

    `*.example.com` covers `a.example.com`, but neither `example.com` nor
    `a.b.example.com`; a wildcard needs at least two labels after it.
    """
    address = _ip_or_none(host)
    if address is not None:
        return any(ipaddress.ip_address(ip) == address for ip in info.ip_addresses)
    wanted = _normalise_dns(host)
    for pattern in map(_normalise_dns, info.dns_names):
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and pattern.count(".") >= 2:
            first, _, rest = wanted.partition(".")
            if first and "*" not in first and rest == pattern[2:]:
                return True
    return False


def should_renew(
    cert_pem: bytes | None,
    now: dt.datetime,
    renew_before: dt.timedelta,
    hostnames: list[str] | None = None,
    *,
    replace_self_signed: bool = False,
) -> tuple[bool, str]:
    """The one renewal decision, with the reason a log line or `--dry-run` prints.

    Renewing when names changed is what makes adding a registry domain take effect on
    the next reconfigure instead of at the next expiry. `replace_self_signed` is for
    Let's Encrypt paths: the self-signed placeholder nginx starts with is always due.
    """
    if cert_pem is None:
        return True, "no certificate yet"
    try:
        info = certificate_info(cert_pem)
    except CertificateError as error:
        return True, f"the current certificate cannot be read ({error})"
    if replace_self_signed and info.self_signed:
        return True, "the current certificate is a self-signed placeholder"
    if hostnames is not None:
        missing = [host for host in hostnames if not covers(info, host)]
        if missing:
            return True, (
                f"names changed: {', '.join(missing)} not covered "
                f"(certificate covers: {', '.join(info.names) or 'no names'})"
            )
    left = info.not_after - _utc(now)
    days = left.days
    if left <= dt.timedelta(0):
        return True, f"expired on {_date(info.not_after)}"
    if left <= renew_before:
        return True, f"within the renewal window: expires in {days} days"
    return False, f"not due: expires in {days} days ({_date(info.not_after)})"


def next_renewal_run(now: dt.datetime, host: str, runs_per_day: int = 2) -> dt.datetime:
    """The renewer's next wake-up: `runs_per_day` slots a day, shifted per host.

    Like certbot's timer, the shift spreads many hosts across the day so they do not all
    hit the CA at midnight; unlike a random sleep it is stable (a hash of the host
    name), so restarts do not make a host skip or repeat a slot.
    """
    if runs_per_day < 1:
        raise ValueError("runs_per_day must be at least 1")
    now = _utc(now)
    period = dt.timedelta(days=1) / runs_per_day
    digest = hashlib.sha256(host.lower().encode()).digest()
    offset = period * (int.from_bytes(digest[:8], "big") / 2**64)
    offset = dt.timedelta(seconds=int(offset.total_seconds()))
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    run = midnight - period + offset
    while run <= now:
        run += period
    return run


# --- parsing -------------------------------------------------------------------------


def _load_chain(cert_pem: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        chain = []
    if not chain:
        raise CertificateError("The certificate file holds no readable PEM certificate.")
    return chain


def _load_private_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise CertificateError(
            "The key file holds no readable unencrypted PEM private key."
        ) from error
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(
            f"Unsupported key algorithm {type(key).__name__}; use an EC or RSA key."
        )
    return key


def _info(cert: x509.Certificate) -> CertificateInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        # Pre-SAN certificates: clients still fall back to the CN.
        dns_names = tuple(
            str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
        ips = ()
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns_names,
        ip_addresses=ips,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        self_signed=_is_self_signed(cert),
    )


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, x509.InvalidSignature):
        return False
    return True


def _mismatch_message(chain: list[x509.Certificate], spki: bytes, info: CertificateInfo) -> str:
    message = f"The private key does not match the certificate for {info.subject}."
    for position, cert in enumerate(chain[1:], start=2):
        if _spki(cert.public_key()) == spki:
            return (
                f"{message} It matches certificate #{position} in the file: put the "
                "server certificate first, then its intermediates."
            )
    return message


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _general_names(hostnames: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        address = _ip_or_none(host)
        names.append(x509.IPAddress(address) if address else x509.DNSName(host))
    return names


def is_ip_address(host: str) -> bool:
    """IPv4 or IPv6 literal (brackets allowed), which only IP SANs can cover."""
    return _ip_or_none(host) is not None


def _ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _normalise_dns(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _utc(moment: dt.datetime | None) -> dt.datetime:
    if moment is None:
        return dt.datetime.now(dt.UTC)
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment.astimezone(dt.UTC)


def _date(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
