"""The registry's TLS certificate, in one of three modes (settings.tls_mode):

- letsencrypt: nginx starts on a placeholder so it can answer the http-01 challenge;
  once it runs, the order is placed (a late resource) and the issued chain replaces
  the placeholder atomically, then nginx is reloaded. The renewer program re-runs the
  same decision twice a day.
- files: the admin's certificate and key, checked before anything changes (key matches,
  not expired, names cover the host); a change of their content reloads nginx.
- self-signed: generated once, reused, regenerated only before it expires.

Whatever the mode, a certificate that changes notifies `reload nginx`: the bug where a
certificate changed and its reader kept serving the old one cannot happen.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

from appliance import pki
from appliance.engine import Engine, Report
from appliance.errors import ConfigError
from appliance.resources import (
    CertificateState,
    Change,
    File,
    Resource,
    SelfSignedCertificate,
    atomic_write,
    reload,
)
from appliance.secrets import Secrets
from appliance.settings import Settings
from recipes import supervisor


def certificate_paths(settings: Settings) -> tuple[Path, Path]:
    rn = settings.registry_nginx
    return Path(rn.ssl_certificate), Path(rn.ssl_certificate_key)


def preflight(settings: Settings, now: datetime | None = None) -> None:
    """Refuse admin-supplied certificate files that nginx would fail on, before any change."""
    if settings.tls_mode != "files" or not settings.registry_nginx.enable:
        return
    cert_path, key_path = certificate_paths(settings)
    problems = []
    for what, path in (("registry_nginx.ssl_certificate", cert_path),
                       ("registry_nginx.ssl_certificate_key", key_path)):
        if not path.is_file():
            problems.append(f"{what}: {path} does not exist or is not a file")
    if not problems:
        found = pki.check_certificate(cert_path.read_bytes(), key_path.read_bytes(),
                                      [settings.registry_host], now or datetime.now(UTC))
        problems += [f"registry_nginx.ssl_certificate: {cert_path}: {p}" for p in found]
    if problems:
        raise ConfigError(f"the certificate files cannot be used: {len(problems)} problem"
                          f"{'s' * (len(problems) > 1)}; nothing was changed.", problems)


@dataclass
class AcmeCertificate(Resource):
    """A Let's Encrypt certificate, ordered when `pki.should_renew` says so, never otherwise."""

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
    force: bool = False
    notifies: tuple = ()
    now: datetime | None = None
    kind: ClassVar[str] = "certificate"
    issued: object = field(default=None, init=False)

    @property
    def name(self) -> str:
        return str(self.cert_path)

    def current(self) -> CertificateState:
        def read(path: Path) -> bytes | None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None
        return CertificateState(read(self.cert_path), read(self.key_path))

    def plan(self, current: CertificateState) -> list[Change]:
        now = self.now or datetime.now(UTC)
        source = f"from {self.directory_url}"
        if self.force:
            return [Change(f"order {source}: renewal forced")]
        if current.cert_pem and pki.certificate_info(current.cert_pem).self_signed:
            return [Change(f"order {source}: replacing the placeholder")]
        if current.cert_pem and current.key_pem and \
                not pki.public_key_matches(current.cert_pem, current.key_pem):
            return [Change(f"order {source}: the key does not match the certificate")]
        due, reason = pki.should_renew(current.cert_pem, now, self.renew_before, self.domains)
        return [Change(f"order {source}: {reason}")] if due else []

    def apply(self) -> None:
        from appliance.letsencrypt import obtain_certificate

        issued = obtain_certificate(
            self.domains, directory_url=self.directory_url,
            account_key_pem=self.account_key_pem, webroot=self.webroot,
            contact_emails=self.contact_emails, ca_bundle=self.ca_bundle,
            key_type=self.key_type)
        # Key first: nginx reloads only after both are in place.
        atomic_write(self.key_path, issued.key_pem, 0o600)
        atomic_write(self.cert_path, issued.fullchain_pem, 0o644)


def _fingerprint(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest() + "\n"


def certificate_resources(settings: Settings) -> list[Resource]:
    if not settings.registry_nginx.enable:
        return []
    cert, key = certificate_paths(settings)
    notify = (reload("nginx"),)
    if settings.tls_mode == "files":
        # The files are the admin's; what we own is the record of what nginx last loaded,
        # so a changed certificate (renewed by some other tool) reloads nginx.
        return [File(settings.paths.nginx_dir / "certificate.sha256", _fingerprint(cert, key),
                     0o644, notifies=notify)]
    kind = PlaceholderCertificate if settings.tls_mode == "letsencrypt" else \
        SelfSignedCertificate
    return [kind(cert, key, [settings.registry_host], notifies=notify)]


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    return certificate_resources(settings) + renewer_resources(settings)


class PlaceholderCertificate(SelfSignedCertificate):
    """Self-signed, only when there is no certificate at all: nginx must start to answer
    the first challenge, and a real certificate must never be replaced by a placeholder."""

    def plan(self, current: CertificateState) -> list[Change]:
        if current.cert_pem is None or current.key_pem is None:
            return [Change("create placeholder until Let's Encrypt issues one")]
        return []


def acme_certificate(settings: Settings, secrets: Secrets, force: bool = False) -> AcmeCertificate:
    cert, key = certificate_paths(settings)
    le = settings.letsencrypt
    return AcmeCertificate(
        cert, key, [settings.registry_host], directory_url=le.directory_url,
        account_key_pem=secrets.letsencrypt_account_key.encode(),
        webroot=settings.paths.acme_webroot, contact_emails=list(le.contact_emails),
        ca_bundle=le.ca_bundle, key_type=le.key_type,
        renew_before=timedelta(days=le.renew_before_days), force=force,
        notifies=(reload("nginx"),))


def late_resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    if settings.tls_mode != "letsencrypt" or not settings.registry_nginx.enable:
        return []
    return [acme_certificate(settings, secrets)]


def renewer_resources(settings: Settings) -> list[Resource]:
    """The renewer program: on for Let's Encrypt and self-signed, off for admin files."""
    wanted = settings.registry_nginx.enable and settings.tls_mode != "files" and \
        settings.letsencrypt.auto_renew
    if not wanted:
        return supervisor.disabled(settings, "renewer")
    command = [supervisor.executable("appliance-ctl"), "-c", str(settings.paths.config_file),
               "renew-certs", "--daemon"]
    return supervisor.program(settings, "renewer", command)


def renew(settings: Settings, force: bool = False, stream=sys.stdout) -> int:  # noqa: ANN001
    """One renewal pass: the same resources reconfigure converges, and nginx reloaded
    if a certificate changed. Nothing is ordered when nothing is due."""
    from appliance import reconfigure
    from appliance import secrets as secrets_module

    out = reconfigure.RunLog(stream, settings.paths.log_dir / "renewer")
    with reconfigure.reconfigure_lock(settings.paths.lock_file, out):
        secrets = secrets_module.load_or_generate(
            settings.paths.secrets_file, settings.registry.internal_key,
            settings.registry.token_key_type, settings.registry.issuer)
        items = certificate_resources(settings)
        if settings.tls_mode == "letsencrypt" and settings.registry_nginx.enable:
            items.append(acme_certificate(settings, secrets, force=force))
        elif force and settings.tls_mode == "self-signed":
            for item in items:
                if isinstance(item, SelfSignedCertificate):
                    item.renew_before = timedelta(days=100000)
        report = Engine(out).converge(items)
        reconfigure.notify(settings, report.notifications, False, out, start=False)
        out(f"renew-certs: {report.updated}/{len(report.outcomes)} certificates renewed")
        out.save()
    return 1 if report.failed else 0


def renew_forever(settings: Settings) -> int:
    """The renewer program: twice a day with a per-host jitter, forever.

    appliance.yml is read again before each pass, so a reconfigure never has to restart
    the renewer for it to see new settings.
    """
    from appliance import settings as settings_module

    while True:
        now = datetime.now(UTC)
        next_run = pki.next_renewal_run(now, settings.registry_host,
                                        settings.letsencrypt.runs_per_day)
        print(f"renewer: next check at {next_run.isoformat()}", flush=True)
        time.sleep(max(1.0, (next_run - now).total_seconds()) + random.random())
        try:
            settings = settings_module.load(settings.paths.config_file)
            renew(settings)
        except Exception as exc:  # noqa: BLE001 - the renewer must outlive one bad attempt
            print(f"renewer: renewal attempt failed: {exc}", flush=True)


def messages(settings: Settings, report: Report) -> list[str]:
    if settings.tls_mode == "self-signed" and settings.registry_nginx.enable:
        cert, _ = certificate_paths(settings)
        return [f"TLS: self-signed certificate {cert}; clients must trust it (docker: copy it "
                f"to /etc/docker/certs.d/{settings.registry_host}:{settings.registry_port}/"
                f"ca.crt)."]
    return []
