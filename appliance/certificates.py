"""The registry certificate's resources, and the host fact that picks among them.

The TLS recipe (recipes/tls.py) declares which of these a host gets; here is how each
one reads the host, decides and writes. The certificate is
`<root>/etc/appliance/ssl/<registry host>.crt|.key` unless the admin names other files.
Every certificate the appliance writes is recorded (SHA-256, under
<root>/var/opt/appliance/tls/), so that a CA-signed certificate it did not write is
known to be the admin's, placed by hand as in the guide's own-domain example, and is
never overwritten (`placed_by_admin`, read once per run into the settings).

`appliance.pki` (cryptography, tens of milliseconds to import) is imported only where a
certificate is parsed: loading the settings for `appliance-ctl status` reads at most a
file's hash.
"""

from __future__ import annotations

import hashlib
import secrets as random_tokens
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from appliance.resources import (
    CertificateState,
    Change,
    Notify,
    Resource,
    SelfSignedCertificate,
    atomic_write,
)

if TYPE_CHECKING:
    from appliance.settings import Settings

CHALLENGE_DIR = Path(".well-known", "acme-challenge")
# How long an order waits for nginx to serve the webroot: supervisord reports nginx
# started before it listens, and the first order follows right after.
WEBROOT_WAIT_SECONDS = 15.0
ORDER_DEADLINE_SECONDS = 90.0


def certificate_paths(settings: Settings) -> tuple[Path, Path]:
    rn = settings.registry_nginx
    return Path(rn.ssl_certificate), Path(rn.ssl_certificate_key)


def written_record(settings: Settings) -> Path:
    """SHA-256 of the certificate the appliance itself last wrote for the registry host."""
    return settings.paths.data_dir / "tls" / f"{settings.registry_host}.crt.sha256"


def placed_by_admin(settings: Settings) -> bool:
    """Read from disk: whether the certificate at the default path is one the admin put there.

    The guide's own-domain example does exactly that (place the files, set the URL, no
    path keys). A CA-signed certificate the appliance did not write is the admin's: it
    is served as it is and never replaced by a placeholder, a self-signed certificate or
    a Let's Encrypt order, which would otherwise overwrite it once it came due. A run
    asks this once, when its settings are loaded (`settings.facts.certificate_placed_by_admin`).
    """
    if settings.tls_mode == "files":
        return False
    cert, _ = certificate_paths(settings)
    try:
        content = cert.read_bytes()
    except OSError:
        return False
    try:
        recorded = written_record(settings).read_text().strip()
    except OSError:
        recorded = ""
    if recorded == hashlib.sha256(content).hexdigest():
        return False  # the appliance wrote it
    from appliance import pki

    try:
        return not pki.certificate_info(content).self_signed
    except pki.CertificateError:
        return False


def effective_mode(settings: Settings) -> str:
    """settings.tls_mode, except "files" while a certificate the admin placed by hand is at
    the default path (the run's host fact, not a new look at the disk)."""
    return "files" if settings.facts.certificate_placed_by_admin else settings.tls_mode


def read_certificate(cert_path: Path, key_path: Path) -> CertificateState:
    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    return CertificateState(read(cert_path), read(key_path))


def unusable_pair(current: CertificateState) -> str | None:
    """Why nginx could not load this certificate and key at all, or None."""
    from appliance import pki

    if current.cert_pem is None or current.key_pem is None:
        return "no certificate yet"
    try:
        if not pki.public_key_matches(current.cert_pem, current.key_pem):
            return "the key does not match the certificate"
    except pki.CertificateError as exc:
        return str(exc)
    return None


def record_written(record: Path | None, cert_path: Path) -> None:
    """Note the certificate just written as the appliance's own (see `placed_by_admin`)."""
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            record, (hashlib.sha256(cert_path.read_bytes()).hexdigest() + "\n").encode(), 0o644
        )


@dataclass
class HostSelfSignedCertificate(SelfSignedCertificate):
    """The self-signed mode's certificate; records that the appliance wrote it."""

    record: Path | None = None

    def apply(self) -> None:
        super().apply()
        record_written(self.record, self.cert_path)


@dataclass
class PlaceholderCertificate(HostSelfSignedCertificate):
    """Self-signed, only where nginx would have nothing it can load: it must start to
    answer the first challenge, and a real certificate is never replaced by this."""

    def plan(self, current: CertificateState) -> list[Change]:
        problem = unusable_pair(current)
        if problem is None:
            return []
        return [Change(f"create placeholder until Let's Encrypt issues one ({problem})")]


@dataclass
class AcmeCertificate(Resource):
    """A Let's Encrypt certificate, ordered when `pki.should_renew` says so, never otherwise.

    On any failure nothing is written: the certificate nginx serves stays, and the error
    names the host and what to check.
    """

    cert_path: Path
    key_path: Path
    domains: list[str]
    directory_url: str
    account_key_pem: bytes
    webroot: Path
    contact_emails: list[str]
    ca_bundle: str | None
    key_type: str
    renew_before: timedelta
    webroot_url: str = ""  # where nginx serves the webroot locally (checked before ordering)
    record: Path | None = None
    force: bool = False
    notifies: tuple[Notify, ...] = ()
    now: datetime | None = None
    kind: ClassVar[str] = "certificate"

    @property
    def name(self) -> str:
        return str(self.cert_path)

    def current(self) -> CertificateState:
        return read_certificate(self.cert_path, self.key_path)

    def plan(self, current: CertificateState) -> list[Change]:
        from appliance import pki

        source = f"order from {self.directory_url}"
        if self.force:
            return [Change(f"{source}: renewal forced")]
        problem = unusable_pair(current)
        if problem is not None:
            return [Change(f"{source}: {problem}")]
        due, reason = pki.should_renew(
            current.cert_pem,
            self.now or datetime.now(UTC),
            self.renew_before,
            self.domains,
            replace_self_signed=True,
        )
        return [Change(f"{source}: {reason}")] if due else []

    def apply(self) -> None:
        from appliance import letsencrypt

        kept = (
            f"The certificate in place ({self.cert_path}) was kept and is still served."
            if self.cert_path.exists()
            else "No certificate was written."
        )
        try:
            if self.webroot_url:
                wait_for_webroot(self.webroot, self.webroot_url, self.domains[0])
            issued = letsencrypt.obtain_certificate(
                self.domains,
                directory_url=self.directory_url,
                account_key_pem=self.account_key_pem,
                webroot=self.webroot,
                contact_emails=self.contact_emails,
                ca_bundle=self.ca_bundle,
                key_type=self.key_type,
                deadline_seconds=ORDER_DEADLINE_SECONDS,
            )
        except letsencrypt.IssuanceError as exc:
            raise type(exc)(f"{exc} {kept}") from None
        # Each file is replaced atomically, key first; nginx reads them only when the
        # reload queued by this resource comes, after both are in place.
        atomic_write(self.key_path, issued.key_pem, 0o600)
        atomic_write(self.cert_path, issued.fullchain_pem, 0o644)
        record_written(self.record, self.cert_path)


def wait_for_webroot(
    webroot: Path, url: str, host: str, timeout: float = WEBROOT_WAIT_SECONDS
) -> None:
    """Serve a probe token and fetch it the way the CA will, before spending an order.

    Waits for nginx, which supervisord reports started before it listens, and turns a
    webroot nginx does not serve (a redirect, a wrong root) into an error about this
    host rather than a failed order counted against the CA's rate limit.
    """
    from appliance.letsencrypt import IssuanceError

    name = f"appliance-self-check-{random_tokens.token_hex(8)}"
    body = random_tokens.token_urlsafe(24)
    directory = webroot / CHALLENGE_DIR
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    import http.client  # only when an order is due: not a no-op reconfigure's cost

    probe = directory / name
    atomic_write(probe, body.encode(), 0o644)
    address, port = url.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    problem = ""
    try:
        while True:
            connection = http.client.HTTPConnection(address.strip("[]"), int(port), timeout=5)
            try:
                connection.request("GET", f"/{CHALLENGE_DIR}/{name}", headers={"Host": host})
                response = connection.getresponse()
                text = response.read().decode(errors="replace")
                if response.status == 200 and text.strip() == body:
                    return
                problem = f"it answered {response.status} {response.reason}" + (
                    f" (redirect to {response.getheader('Location')})"
                    if response.getheader("Location")
                    else ""
                )
            except OSError as exc:
                problem = f"cannot connect: {exc.strerror or exc}"
            finally:
                connection.close()
            if time.monotonic() > deadline:
                raise IssuanceError(
                    f"nginx does not serve the ACME challenge for {host}: "
                    f"http://{url}/{CHALLENGE_DIR}/ {problem}. The CA would fail the same "
                    f"way; check `appliance-ctl status nginx` and its log (appliance-ctl "
                    f"tail nginx), and that nginx.http_port is this appliance's."
                )
            time.sleep(0.2)
    finally:
        probe.unlink(missing_ok=True)


@dataclass
class LeftoverChallengeTokens(Resource):
    """Tokens an interrupted order left in the webroot (a kill, a power cut).

    Orders run under the reconfigure lock, which whoever converges this holds, so no
    token here belongs to an order in flight: the webroot keeps only those.
    """

    webroot: Path
    notifies: tuple[Notify, ...] = ()
    kind: ClassVar[str] = "challenge tokens"

    @property
    def name(self) -> str:
        return str(self.webroot / CHALLENGE_DIR)

    def current(self) -> list[Path]:
        directory = self.webroot / CHALLENGE_DIR
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if p.is_file() or p.is_symlink())

    def plan(self, current: list[Path]) -> list[Change]:
        if not current:
            return []
        return [Change(f"remove {len(current)} left by an interrupted order")]

    def apply(self) -> None:
        for path in self.current():
            path.unlink(missing_ok=True)
