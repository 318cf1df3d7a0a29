"""The registry's TLS certificate, in one of three modes (settings.tls_mode).

The registry vhost is the only TLS vhost, so there is one certificate, for the registry
host (`registry_external_url`'s host; on port 5050 of the main host that is the main
host, on its own domain it is that domain alone). Its files are
`<root>/etc/appliance/ssl/<registry host>.crt|.key` unless the admin names others.

- letsencrypt: nginx starts on a self-signed placeholder so it can answer the http-01
  challenge on `nginx.http_port`; once it runs, the order is placed (a late resource)
  and the issued chain replaces the placeholder, then nginx is reloaded (HUP). The
  renewer program (appliance/programs/renewer.py) runs the same decision
  (`pki.should_renew`) twice a day.
- files: the admin's certificate and key, checked before anything changes (key matches,
  not expired, names cover the host); a change of their content reloads nginx.
- self-signed: generated once, reused, regenerated only within the renewal window
  before it expires (the renewer checks it too).

A CA-signed certificate at the default path that the appliance did not write is the
admin's, placed as in the guide's own-domain example: it is handled as in the files
mode, whatever settings.tls_mode says (`effective_mode`), so it is never overwritten.
Whether one is there is a host fact read once per run, when the settings are loaded.

Whatever the mode, a certificate that changes notifies `reload nginx`, never a restart:
a reload lets in-flight pushes finish on the old workers, and the bug where a
certificate changed and its reader kept serving the old one cannot happen. The
certificate resources themselves live in appliance/certificates.py.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance import pki
from appliance.certificates import (
    CHALLENGE_DIR,
    AcmeCertificate,
    HostSelfSignedCertificate,
    LeftoverChallengeTokens,
    PlaceholderCertificate,
    certificate_paths,
    effective_mode,
    written_record,
)
from appliance.contracts import RESTART, Service
from appliance.engine import Report
from appliance.errors import ApplianceError, ConfigError, ServiceError
from appliance.resources import Directory, File, Resource, SelfSignedCertificate, reload
from appliance.secrets import Secrets
from appliance.settings import Settings
from recipes import supervisor

# ---------------------------------------------------------------- preflight


def preflight(settings: Settings, now: datetime | None = None) -> None:
    """Refuse, before any change, what would only fail later: certificate files nginx
    would reject, or Let's Encrypt asked for a name it never issues for."""
    if not settings.registry_nginx.enable:
        return
    if settings.tls_mode == "letsencrypt" and not settings.facts.certificate_placed_by_admin:
        host = settings.registry_host
        if pki.is_ip_address(host):
            raise ConfigError(
                "Let's Encrypt cannot be used for this registry URL; nothing was changed.",
                [
                    f"letsencrypt.enable: Let's Encrypt does not issue certificates for the IP "
                    f"address {host}; use a DNS name in registry_external_url, or set "
                    f"letsencrypt.enable: false for a self-signed certificate, or configure "
                    f"registry_nginx.ssl_certificate and ssl_certificate_key"
                ],
            )
        return
    if effective_mode(settings) != "files":
        return
    cert_path, key_path = certificate_paths(settings)
    problems = []
    for what, path in (
        ("registry_nginx.ssl_certificate", cert_path),
        ("registry_nginx.ssl_certificate_key", key_path),
    ):
        if not path.is_file():
            problems.append(f"{what}: {path} does not exist or is not a file")
    if not problems:
        try:
            cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        except OSError as exc:
            problems.append(
                f"registry_nginx.ssl_certificate: cannot read {exc.filename}: {exc.strerror}"
            )
        else:
            found = pki.check_certificate(
                cert_pem, key_pem, [settings.registry_host], now or datetime.now(UTC)
            )
            problems += [f"registry_nginx.ssl_certificate: {cert_path}: {p}" for p in found]
    if problems and settings.tls_mode != "files":
        problems.append(
            f"{cert_path} is a certificate placed by hand (not written by the "
            f"appliance): fix it, or remove it and its key to let the appliance "
            f"manage the certificate ({settings.tls_mode})"
        )
    if problems:
        raise ConfigError(
            f"the certificate files cannot be used: {len(problems)} problem"
            f"{'s' * (len(problems) > 1)}; nothing was changed.",
            problems,
        )


# ---------------------------------------------------------------- resources


def _fingerprint(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest() + "\n"


def fingerprint_path(settings: Settings) -> Path:
    return settings.paths.nginx_dir / "certificate.sha256"


def certificate_resources(settings: Settings) -> list[Resource]:
    """The webroot and the certificate nginx loads, each change reloading nginx."""
    if not settings.registry_nginx.enable:
        return []
    cert, key = certificate_paths(settings)
    notify = (reload("nginx"),)
    webroot = settings.paths.acme_webroot
    # nginx serves the challenge path from here in every mode (a switch to Let's
    # Encrypt needs no nginx change); its workers only read it.
    out: list[Resource] = [
        Directory(webroot, 0o755),
        Directory(webroot / CHALLENGE_DIR.parent, 0o755),
        Directory(webroot / CHALLENGE_DIR, 0o755),
        LeftoverChallengeTokens(webroot),
        Directory(written_record(settings).parent, 0o755),
    ]
    record = written_record(settings)
    mode = effective_mode(settings)
    if mode == "files":
        # The files are the admin's; what we own is the record of what nginx last loaded
        # (0600: it hashes the key too), so a changed certificate reloads nginx.
        out.append(
            File(fingerprint_path(settings), _fingerprint(cert, key), 0o600, notifies=notify)
        )
    elif mode == "letsencrypt":
        out.append(
            PlaceholderCertificate(
                cert,
                key,
                [settings.registry_host],
                key_type=settings.letsencrypt.key_type,
                days=90,
                notifies=notify,
                record=record,
            )
        )
    else:
        out.append(
            HostSelfSignedCertificate(
                cert,
                key,
                [settings.registry_host],
                renew_before=timedelta(days=settings.letsencrypt.renew_before_days),
                notifies=notify,
                record=record,
            )
        )
    return out


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    return certificate_resources(settings) + renewer_resources(settings)


def webroot_url(settings: Settings) -> str:
    """host:port where this host's nginx answers http-01 (its first listen address)."""
    return f"{_local_address(settings)}:{settings.nginx.http_port}"


def _local_address(settings: Settings) -> str:
    """nginx's first listen address as this host reaches it ('*' is 127.0.0.1)."""
    address = settings.nginx.listen_addresses[0]
    address = {"*": "127.0.0.1", "[::]": "[::1]"}.get(address, address)
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return address


def acme_certificate(settings: Settings, secrets: Secrets, force: bool = False) -> AcmeCertificate:
    cert, key = certificate_paths(settings)
    le = settings.letsencrypt
    return AcmeCertificate(
        cert,
        key,
        [settings.registry_host],
        directory_url=le.directory_url,
        account_key_pem=secrets.letsencrypt_account_key.encode(),
        webroot=settings.paths.acme_webroot,
        contact_emails=list(le.contact_emails),
        ca_bundle=le.ca_bundle,
        key_type=le.key_type,
        renew_before=timedelta(days=le.renew_before_days),
        webroot_url=webroot_url(settings),
        record=written_record(settings),
        force=force,
        notifies=(reload("nginx"),),
    )


def late_resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    if effective_mode(settings) != "letsencrypt" or not settings.registry_nginx.enable:
        return []
    return [acme_certificate(settings, secrets)]


def renewer_wanted(settings: Settings) -> bool:
    """The renewer program: on for Let's Encrypt and self-signed, off for admin files."""
    return (
        settings.registry_nginx.enable
        and settings.tls_mode != "files"
        and settings.letsencrypt.auto_renew
    )


def service(settings: Settings) -> Service:
    """The renewer serves nothing: RUNNING is all there is to check."""
    return Service(
        "renewer",
        enabled=renewer_wanted(settings),
        reload=RESTART,
        log=supervisor.service_log(settings, "renewer"),
    )


def renewer_resources(settings: Settings) -> list[Resource]:
    if not renewer_wanted(settings):
        return supervisor.disabled(settings, "renewer")
    # A host on the embedded defaults has no appliance.yml: the renewer is told a path
    # (and then insists on it) only when this run read one.
    config = [str(settings.paths.config_file)] if settings.facts.config_file_present else []
    command = [supervisor.executable("python"), "-m", "appliance.programs.renewer", *config]
    return supervisor.program(settings, "renewer", command)


# ---------------------------------------------------------------- renewal


def renewal_resources(settings: Settings, secrets: Secrets, force: bool) -> list[Resource]:
    """What one renewal pass converges: the certificate, and nothing else of the host."""
    items = certificate_resources(settings)
    if effective_mode(settings) == "letsencrypt" and settings.registry_nginx.enable:
        items.append(acme_certificate(settings, secrets, force=force))
    elif force:
        for item in items:
            if isinstance(item, SelfSignedCertificate):
                item.renew_before = timedelta(days=100000)
    return items


def renewal_intro(settings: Settings, force: bool) -> list[str]:
    mode = effective_mode(settings)
    if mode != settings.tls_mode:
        mode = "a certificate placed by hand"
    return [
        f"renew-certs: checking {settings.registry_host} ({mode}"
        f"{', forced' if force else ''}) at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"
    ]


def renewal_preflight(settings: Settings) -> None:
    preflight(settings)
    if not settings.paths.secrets_file.exists():
        raise ApplianceError(
            f"{settings.paths.secrets_file} does not exist: run appliance-ctl reconfigure first."
        )


def renewal_summary(report: Report, elapsed: float) -> str:
    renewed = sum(1 for o in report.outcomes if o.changes and o.resource.kind == "certificate")
    return (
        f"renew-certs: {renewed} certificate{'s' * (renewed != 1)} renewed in "
        f"{elapsed:.1f} s" + ("; failed" if report.failed else "")
    )


def check_served(settings: Settings, report: Report) -> list[str]:
    """After a renewal reloaded nginx: "renewed" is only true once a new connection gets
    the new certificate (nginx reloads asynchronously; a reload it refused keeps the old
    one). A stopped nginx loads it when it starts."""
    reloaded = any(n.service == "nginx" for n in report.notifications)
    if reloaded and served_certificate(settings) is not None and not wait_until_served(settings):
        raise ServiceError(
            f"nginx was reloaded but still serves the previous certificate for "
            f"{settings.registry_host} on {served_address(settings)}; see appliance-ctl tail "
            f"nginx (a reload nginx refuses keeps the old configuration)."
        )
    return []


def served_address(settings: Settings) -> str:
    """host:port of the registry vhost as seen from this host."""
    return f"{_local_address(settings)}:{settings.registry_nginx.listen_port}"


def served_certificate(settings: Settings, timeout: float = 5) -> bytes | None:
    """The DER leaf nginx presents for the registry host (SNI), None if none answers."""
    import socket
    import ssl

    address, port = served_address(settings).rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we compare bytes; trust is the client's business
    try:
        with socket.create_connection((address.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=settings.registry_host) as tls:
                return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def wait_until_served(settings: Settings, timeout: float = 10) -> bool:
    """Whether nginx serves the certificate file's leaf within `timeout` seconds."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert, _ = certificate_paths(settings)
    try:
        wanted = x509.load_pem_x509_certificates(cert.read_bytes())[0].public_bytes(Encoding.DER)
    except (OSError, ValueError):
        return False
    deadline = time.monotonic() + timeout
    while served_certificate(settings) != wanted:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------- messages


def messages(settings: Settings, report: Report) -> list[str]:
    """What is served now. Called after the run's reloads: when a certificate changed,
    waits for nginx to serve it (a reload takes effect asynchronously) and says so if it
    does not."""
    if not settings.registry_nginx.enable:
        return []
    cert, _ = certificate_paths(settings)
    try:
        info = pki.certificate_info(cert.read_bytes())
    except (OSError, pki.CertificateError):
        return []
    lines = []
    # Only when nginx answers (a stopped nginx is `status`'s business) with another
    # certificate than the file: then a reload is under way, or nginx refused it.
    nginx_notified = any(n.service == "nginx" for n in report.notifications)
    if (
        nginx_notified
        and not report.dry_run
        and served_certificate(settings) is not None
        and not wait_until_served(settings, 5)
    ):
        lines.append(
            f"TLS: warning: {served_address(settings)} serves another certificate "
            f"than {cert}; see appliance-ctl tail nginx."
        )
    until = f"{info.not_after:%Y-%m-%d}"
    if settings.facts.certificate_placed_by_admin:
        lines.append(
            f"TLS: certificate {cert} placed by hand, until {until}; it is served as "
            f"it is ({settings.tls_mode} is not used while it is there): replace it "
            f"before then and run reconfigure."
        )
    elif settings.tls_mode == "self-signed":
        lines.append(
            f"TLS: self-signed certificate {cert} (until {until}); clients must "
            f"trust it (docker: copy it to /etc/docker/certs.d/"
            f"{settings.registry_host}:{settings.registry_port}/ca.crt)."
        )
    elif settings.tls_mode == "letsencrypt" and not info.self_signed:
        lines.append(
            f"TLS: Let's Encrypt certificate for {settings.registry_host} until "
            f"{until}; the renewer renews it "
            f"{settings.letsencrypt.renew_before_days} days before."
        )
    elif settings.tls_mode == "files":
        lines.append(
            f"TLS: certificate {cert} until {until}; replace the file before then "
            f"and run reconfigure (nginx reloads when its content changes)."
        )
    return lines
