"""`appliance-ctl check`: every diagnosis of the guide's troubleshooting section, run.

One line per check, `ok`, `warn`, `FAIL` (or `skip`, with the reason it could not run),
each warning and failure with the fix in one sentence; the command exits 1 when one
check failed. The checks look at the host as the services see it, not at appliance.yml:
supervisord's processes and the addresses they hold, the certificate nginx serves, the
key the token service signs with against the bundle the registry trusts, the storage
written as the registry's account writes it, a token fetched through nginx and accepted
by the registry, and a tiny image pushed and pulled through the registry's API.

What to look at comes from the recipes (`recipes.check_plan(settings)` builds a
`CheckPlan`): this module knows how to diagnose, the recipes know where things are.
Thresholds are constants here, and the verdicts on figures (`disk_verdict`,
`certificate_verdict`, `clock_verdict`) are pure functions tested as tables.

The probes run side by side in threads (most of the time is waiting on sockets), so a
healthy appliance is checked in about a second; a time source that does not answer
costs at most CLOCK_TIMEOUT.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import datetime as dt
import email.utils
import gzip
import hashlib
import http.client
import io
import json
import os
import socket
import ssl
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from appliance.auth.names import CHECK_NAMESPACE
from appliance.auth.sizes import format_size
from appliance.contracts import Service
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.auth.database import Database
    from appliance.cluster import Verdict
    from appliance.registry_api import RegistryAPI
    from appliance.registry_storage import S3Storage, Storage

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"

CERTIFICATE_WARN_DAYS = 14
"""Fewer days of validity left: warn (Let's Encrypt renews 30 days ahead, so a
certificate this close to its end means renewal has been failing for two weeks)."""
DISK_WARN_FREE = 0.10
"""Less free space than this share of the file system: warn."""
DISK_FAIL_FREE = 0.02
"""Less than this: FAIL (a push of one large layer fills it; logs stop being written)."""
CLOCK_WARN_SECONDS = 10
"""A clock further off than this from a time source: warn (an HTTP Date header has
one-second resolution, so less is noise)."""
CLOCK_FAIL_SECONDS = 60
"""Further off than the registry's 60 s leeway on token times: FAIL."""
CLOCK_TIMEOUT = 1.0
"""Seconds the time sources get, all asked at once; none answering skips the check."""
CONNECT_TIMEOUT = 2.0
PROBE_REPOSITORY = f"{CHECK_NAMESPACE}/probe"
"""Where the push and pull probe goes: in a namespace no user or project can have
(appliance/auth/names.py); only administrators (and the appliance's own tokens) reach
it, the probe removes it again, and the registry's events for it are not recorded."""
PROBE_TAG = "probe"


@dataclass(frozen=True)
class Result:
    check: str
    status: str
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.check}: {self.message}"
        return f"{text} Fix: {self.fix}" if self.fix else text


@dataclass(frozen=True)
class Port:
    address: str  # host:port as this host reaches it
    setting: str  # the key that chose it


@dataclass
class CheckPlan:
    """Where everything is, from the recipes; see `recipes.check_plan`."""

    services: list[Service]
    stopped_by_admin: set[str]
    supervisor_config: Path
    supervisor_socket: Path
    supervisord_pid: int | None
    registry_host: str
    ports: list[Port]
    tls_address: str | None  # host:port of the registry vhost, None without one
    tls_mode: str
    certificate: Path
    certificate_key: Path
    registry_enabled: bool
    auth_enabled: bool
    signing_key: Path
    trusted_bundle: Path  # the registry's rootcertbundle (or auth's certificate file)
    issuer: str
    service: str
    storage: dict
    storage_user: str | None
    storage_lock: Path
    registry_api: Callable[[], RegistryAPI]
    open_storage: Callable[[], Storage]
    clock_urls: list[str]
    disks: list[tuple[str, Path]]
    ntp_servers: list[str] = field(default_factory=list)
    # This node's secrets against the cluster's record (appliance/cluster.py); None when
    # no node ever ran `cluster export` (a single node).
    cluster: Callable[[], Verdict | None] | None = None
    # The registry's Redis (redis.url): host:port, password; None without one.
    redis: tuple[str, str | None] | None = None
    # The token service's database (a SQLite file or PostgreSQL); None without the service.
    database: Database | None = None
    # janitor.json, the janitor's last run and next; None with the janitor off.
    janitor_state: Path | None = None


@dataclass
class Report:
    results: list[Result]
    seconds: float

    @property
    def failed(self) -> bool:
        return any(r.status == FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in (OK, WARN, FAIL, SKIP)}

    def text(self) -> str:
        counts = self.counts()
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        lines = [r.line() for r in self.results]
        lines.append(f"check: {summary} in {self.seconds:.2f} s")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "ok": not self.failed,
                    "seconds": round(self.seconds, 3),
                    "counts": self.counts(),
                    "checks": [asdict(r) for r in self.results],
                },
                indent=2,
            )
            + "\n"
        )


def run(plan: CheckPlan) -> Report:
    """Every check, side by side; results in a fixed order."""
    started = time.monotonic()
    groups: list[Callable[[CheckPlan], list[Result]]] = [
        check_services,
        check_ports,
        check_certificate,
        check_signing_key,
        check_storage,
        check_token_round_trip,
        check_push_pull,
        check_clock,
        check_disks,
        check_cluster,
        check_redis,
        check_database,
        check_janitor,
    ]
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        futures = [pool.submit(_guarded, group, plan) for group in groups]
        results = [result for future in futures for result in future.result()]
    return Report(results, time.monotonic() - started)


GROUP_NAMES = {
    "check_push_pull": ("push and pull", "appliance-ctl tail registry says why."),
    "check_token_round_trip": ("token round trip", "appliance-ctl tail auth says why."),
    "check_storage": ("storage", "check registry.storage and appliance-ctl tail registry."),
    "check_cluster": ("cluster", "check registry.storage: every node must share it."),
    "check_database": ("auth database", ""),
}


def _guarded(group: Callable[[CheckPlan], list[Result]], plan: CheckPlan) -> list[Result]:
    """A check that raises an appliance error failed with that sentence; anything else
    is a bug in the check and keeps its traceback."""
    try:
        return group(plan)
    except ApplianceError as error:
        default = (group.__name__.removeprefix("check_").replace("_", " "), "")
        name, fix = GROUP_NAMES.get(group.__name__, default)
        return [Result(name, FAIL, str(error), fix)]


# ---------------------------------------------------------------- verdicts (pure)


def disk_verdict(label: str, path: Path, free: int, total: int) -> Result:
    share = free / total if total else 0.0
    message = f"{path}: {format_size(free)} free of {format_size(total)} ({share:.0%})"
    fix = f"free space on the file system of {path} (or grow it)"
    if share < DISK_FAIL_FREE:
        return Result(f"disk {label}", FAIL, message + f", under {DISK_FAIL_FREE:.0%}.", fix + ".")
    if share < DISK_WARN_FREE:
        return Result(f"disk {label}", WARN, message + f", under {DISK_WARN_FREE:.0%}.", fix + ".")
    return Result(f"disk {label}", OK, message + ".")


def certificate_verdict(
    problems: list[str], days_left: float, self_signed: bool, tls_mode: str, path: Path
) -> Result:
    """pki.check_certificate's problems, days of validity left, the issuer kind."""
    if problems:
        fix = (
            "appliance-ctl renew-certs --force (or check the renewer's log under "
            "/var/log/appliance/renewer/)"
            if tls_mode in ("letsencrypt", "self-signed")
            else f"install a valid certificate and key at {path} and run appliance-ctl reconfigure"
        )
        return Result("certificate", FAIL, " ".join(problems), fix + ".")
    if tls_mode == "letsencrypt" and self_signed:
        return Result(
            "certificate",
            FAIL,
            "nginx serves the self-signed placeholder: Let's Encrypt has not issued "
            "a certificate yet.",
            "appliance-ctl renew-certs says why (DNS, port 80, rate limits; README: When "
            "issuance fails).",
        )
    days = int(days_left)
    if days_left < CERTIFICATE_WARN_DAYS:
        return Result(
            "certificate",
            WARN,
            f"{path} expires in {days} days.",
            "appliance-ctl renew-certs (look at /var/log/appliance/renewer/ for why the "
            "renewal did not happen)"
            if tls_mode != "files"
            else "install the renewed certificate and run appliance-ctl reconfigure.",
        )
    note = "; self-signed: clients must trust this file" if self_signed else ""
    return Result("certificate", OK, f"{path} is valid for {days} more days{note}.")


def clock_verdict(offset: float, source: str) -> Result:
    """`offset`: this host's clock minus the source's, in seconds."""
    ahead = "ahead of" if offset > 0 else "behind"
    message = f"{abs(offset):.1f} s {ahead} {source}"
    fix = "run NTP on this host (timedatectl set-ntp true, or chrony)."
    if abs(offset) > CLOCK_FAIL_SECONDS:
        return Result(
            "clock",
            FAIL,
            message + f": more than the registry's {CLOCK_FAIL_SECONDS} s leeway on tokens.",
            fix,
        )
    if abs(offset) > CLOCK_WARN_SECONDS:
        return Result("clock", WARN, message + ".", fix)
    return Result("clock", OK, message + ".")


# ---------------------------------------------------------------- services and ports


def _answers(address: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """None when a connection to `address` is accepted, else the error."""
    try:
        if address.startswith("/"):
            with socket.socket(socket.AF_UNIX) as unix:
                unix.settimeout(timeout)
                unix.connect(address)
            return None
        host, _, port = address.rpartition(":")
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout).close()
        return None
    except OSError as error:
        return error.strerror or str(error)


def check_services(plan: CheckPlan) -> list[Result]:
    from appliance import procfs
    from appliance.services import Supervisor, SupervisorNotRunningError

    enabled = [s for s in plan.services if s.enabled]
    try:
        statuses = {
            s.name: s for s in Supervisor(plan.supervisor_config, plan.supervisor_socket).status()
        }
    except SupervisorNotRunningError:
        return [
            Result(
                "services",
                FAIL,
                "supervisord is not running, so no service is.",
                "appliance-ctl reconfigure starts it (on a host: systemctl start "
                "appliance-runsvdir).",
            )
        ]
    table = procfs.ListenTable()
    ours = set(procfs.tree(plan.supervisord_pid)) if plan.supervisord_pid else set()
    results = []
    for service in enabled:
        name = f"service {service.name}"
        status = statuses.get(service.name)
        if status is None:
            results.append(
                Result(name, FAIL, "supervisord does not know it.", "appliance-ctl reconfigure.")
            )
            continue
        if not status.running:
            if service.name in plan.stopped_by_admin:
                fix = f"appliance-ctl start {service.name}."
                why = "stopped with appliance-ctl stop"
            else:
                fix = (
                    f"appliance-ctl tail {service.name} says why; then appliance-ctl "
                    f"start {service.name}."
                )
                why = status.description or "not running"
            results.append(Result(name, FAIL, f"{status.state.lower()} ({why}).", fix))
            continue
        if service.ready:
            holder = procfs.listener(service.ready, ours, table)
            if holder is not None and ours and holder.pid not in ours:
                setting = service.binds.get(service.ready, "its address")
                results.append(
                    Result(
                        name,
                        FAIL,
                        f"runs, but {holder} holds {service.ready}.",
                        f"stop that process or set another {setting} in appliance.yml.",
                    )
                )
                continue
            problem = _answers(service.ready)
            if problem:
                results.append(
                    Result(
                        name,
                        FAIL,
                        f"runs (pid {status.pid}) but does not accept connections on "
                        f"{service.ready} ({problem}).",
                        f"appliance-ctl tail {service.name} says why.",
                    )
                )
                continue
        where = f", answers on {service.ready}" if service.ready else ""
        results.append(
            Result(name, OK, f"running (pid {status.pid}, up {status.uptime} s){where}.")
        )
    return results


def check_ports(plan: CheckPlan) -> list[Result]:
    results = [_resolves(plan.registry_host)]
    for port in plan.ports:
        problem = _answers(port.address)
        if problem:
            results.append(
                Result(
                    f"port {port.address}",
                    FAIL,
                    f"nothing answers ({problem}); it is {port.setting}.",
                    "appliance-ctl status nginx; appliance-ctl tail nginx says why.",
                )
            )
        else:
            results.append(Result(f"port {port.address}", OK, f"answers ({port.setting})."))
    return results


def _resolves(host: str) -> Result:
    name = f"name {host}"
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as error:
        return Result(
            name,
            FAIL,
            f"does not resolve on this host ({error}).",
            f"add DNS A/AAAA records (or an /etc/hosts line) for {host}.",
        )
    addresses = sorted({info[4][0] for info in infos})
    local = [a for a in addresses if _is_local(a)]
    if not local:
        return Result(
            name,
            WARN,
            f"resolves to {', '.join(addresses)}, none of them an address of this host.",
            f"point {host} at this host, unless a load balancer or NAT forwards to it.",
        )
    return Result(name, OK, f"resolves to {', '.join(addresses)}.")


def _is_local(address: str) -> bool:
    """An address of this host: one a socket can bind."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- TLS


def _served_leaf(address: str, server_name: str) -> bytes | None:
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # compared with the file; trust is the client's
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def check_certificate(plan: CheckPlan) -> list[Result]:
    if plan.tls_address is None:
        return [Result("certificate", SKIP, "no TLS vhost (registry_nginx.enable: false).")]
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from appliance import pki

    try:
        cert_pem = plan.certificate.read_bytes()
        key_pem = plan.certificate_key.read_bytes()
    except OSError as error:
        return [
            Result(
                "certificate",
                FAIL,
                f"cannot read {error.filename}: {error.strerror}.",
                "run appliance-ctl reconfigure (it makes or orders the certificate).",
            )
        ]
    now = dt.datetime.now(dt.UTC)
    problems = pki.check_certificate(cert_pem, key_pem, [plan.registry_host], now)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        info = pki.certificate_info(cert_pem)
    except (ValueError, pki.CertificateError):
        return [
            certificate_verdict(
                problems or ["unreadable"], 0, False, plan.tls_mode, plan.certificate
            )
        ]
    problems += _chain_problems(chain)
    days_left = (info.not_after - now).total_seconds() / 86400
    results = [
        certificate_verdict(problems, days_left, info.self_signed, plan.tls_mode, plan.certificate)
    ]
    served = _served_leaf(plan.tls_address, plan.registry_host)
    if served is None:
        results.append(
            Result(
                "certificate served",
                FAIL,
                f"no TLS handshake on {plan.tls_address}.",
                "appliance-ctl status nginx; appliance-ctl tail nginx says why.",
            )
        )
    elif served != chain[0].public_bytes(Encoding.DER):
        results.append(
            Result(
                "certificate served",
                FAIL,
                f"nginx serves another certificate on {plan.tls_address} than {plan.certificate}.",
                "appliance-ctl hup nginx (nginx reads certificates when it reloads).",
            )
        )
    else:
        results.append(
            Result(
                "certificate served",
                OK,
                f"nginx serves {plan.certificate.name} on {plan.tls_address}.",
            )
        )
    return results


def _chain_problems(chain: list) -> list[str]:
    """Each certificate of the file signed by the next one (server first, then the
    intermediates), the order clients need."""
    from cryptography.exceptions import InvalidSignature

    problems = []
    for child, parent in zip(chain, chain[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as error:
            problems.append(
                f"The chain is out of order or incomplete: {child.subject.rfc4514_string()} "
                f"is not issued by {parent.subject.rfc4514_string()} ({type(error).__name__}); "
                f"put the server certificate first, then each intermediate."
            )
            break
    return problems


# ---------------------------------------------------------------- tokens


def check_signing_key(plan: CheckPlan) -> list[Result]:
    """The key the token service signs with must have its certificate in the bundle the
    registry trusts, or every token is 'signed by untrusted key'."""
    if not plan.auth_enabled:
        return [Result("signing key", SKIP, "the token service is disabled (auth.enable: false).")]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(plan.signing_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        return [
            Result(
                "signing key",
                FAIL,
                f"cannot load the token-signing key {plan.signing_key} ({error}).",
                "restore it from the secrets file: appliance-ctl reconfigure writes it again.",
            )
        ]
    try:
        bundle = x509.load_pem_x509_certificates(plan.trusted_bundle.read_bytes())
    except (OSError, ValueError) as error:
        return [
            Result(
                "signing key",
                FAIL,
                f"cannot read the registry's token bundle {plan.trusted_bundle} ({error}).",
                "appliance-ctl reconfigure writes it again.",
            )
        ]
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    mine = key.public_key().public_bytes(der, spki)
    if not any(cert.public_key().public_bytes(der, spki) == mine for cert in bundle):
        return [
            Result(
                "signing key",
                FAIL,
                f"no certificate in {plan.trusted_bundle} ({len(bundle)}) matches the "
                f"token-signing key {plan.signing_key}: the registry refuses every token "
                f"('signed by untrusted key').",
                "appliance-ctl reconfigure writes the bundle from the secrets file again "
                "(an external registry: copy the bundle to it).",
            )
        ]
    return [
        Result(
            "signing key",
            OK,
            f"{plan.signing_key.name} matches a certificate of {plan.trusted_bundle} "
            f"({len(bundle)} in the bundle).",
        )
    ]


def redis_ping(address: str, password: str | None, timeout: float = CONNECT_TIMEOUT) -> str:
    """Redis's answer to (AUTH and) PING in its protocol, or the connection's error."""
    host, _, port = address.rpartition(":")

    def command(*words: str) -> bytes:
        parts = [f"*{len(words)}\r\n".encode()]
        for word in words:
            data = word.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout) as conn:
            reader = conn.makefile("rb")
            if password:
                conn.sendall(command("AUTH", password))
                answer = reader.readline().decode(errors="replace").strip()
                if answer != "+OK":
                    return answer.lstrip("-") or "no answer to AUTH"
            conn.sendall(command("PING"))
            return reader.readline().decode(errors="replace").strip().lstrip("+-")
    except OSError as error:
        return error.strerror or str(error)


def check_redis(plan: CheckPlan) -> list[Result]:
    """The registry's blob-descriptor cache: a Redis that does not answer costs no
    request (the registry reads the storage instead) but every pull is colder: warn."""
    if plan.redis is None:
        return []
    address, password = plan.redis
    answer = redis_ping(address, password)
    if answer == "PONG":
        return [Result("redis", OK, f"{address} answers PING: the registry's cache is shared.")]
    return [
        Result(
            "redis",
            WARN,
            f"{address} does not answer PING ({answer}): the registry reads every blob "
            f"descriptor from the storage (slower, nothing fails).",
            "check redis.url, redis.password_file and that Redis accepts this host.",
        )
    ]


def check_database(plan: CheckPlan) -> list[Result]:
    """The token service's users, projects and tokens: a database it cannot reach, or
    whose schema is not the one this version writes, refuses every sign-in. The schema
    number is read without changing anything (SQLite opened read-only)."""
    if plan.database is None:
        return []
    from appliance.auth.migrations import MIGRATIONS
    from appliance.auth.store import schema_version

    name = "auth database"
    engine = "SQLite" if isinstance(plan.database, Path) else "PostgreSQL"
    where = f"{engine} {plan.database}"
    version = schema_version(plan.database)  # unreachable: one sentence, see _guarded
    current = len(MIGRATIONS)
    if version is None:
        return [
            Result(
                name,
                FAIL,
                f"{where} holds no schema yet: the token service cannot start on it.",
                "run appliance-ctl reconfigure (it creates the schema).",
            )
        ]
    if version < current:
        return [
            Result(
                name,
                FAIL,
                f"{where} has schema {version}, this version needs {current}.",
                "run appliance-ctl reconfigure (it migrates the schema).",
            )
        ]
    if version > current:
        return [
            Result(
                name,
                FAIL,
                f"{where} has schema {version}, newer than this version's {current}: a "
                f"newer appliance migrated it.",
                "install on this host the package version the other nodes run.",
            )
        ]
    return [Result(name, OK, f"{where} answers; schema {version}, current.")]


def check_janitor(plan: CheckPlan) -> list[Result]:
    """The scheduled retention and collection run unattended: a failed run says so only
    in the janitor's log, so the next check warns until a run succeeds."""
    if plan.janitor_state is None:
        return []
    from appliance.retention import read_janitor_state, stamp

    state = read_janitor_state(plan.janitor_state)
    last, upcoming = state.get("last") or {}, state.get("next")
    following = f" The next run is at {stamp(upcoming)}." if upcoming else ""
    if not last:
        return [Result("janitor", OK, f"no scheduled run yet.{following}")]
    when = stamp(last.get("started", 0))
    if last.get("result", "ok") == "ok":
        return [Result("janitor", OK, f"the last run ({when}) succeeded.{following}")]
    return [
        Result(
            "janitor",
            WARN,
            f"the last run ({when}) ended with: {last['result']}.{following}",
            "appliance-ctl tail janitor says why; appliance-ctl retention run and "
            "appliance-ctl registry-garbage-collect run the same steps by hand.",
        )
    ]


def check_cluster(plan: CheckPlan) -> list[Result]:
    """A node whose signing key or http secret is not the cluster's fails every token and
    upload another node began; no line at all on a node that is no cluster's."""
    verdict = plan.cluster() if plan.cluster else None
    if verdict is None:
        return []
    if verdict.matches:
        return [Result("cluster", OK, verdict.sentence[:1].upper() + verdict.sentence[1:])]
    sentence, _, fix = verdict.sentence.partition("; run ")
    return [Result("cluster", FAIL, sentence[:1].upper() + sentence[1:] + ".", "Run " + fix)]


class _LocalHTTPS(http.client.HTTPSConnection):
    """https to the registry vhost by its name (SNI, Host) at a local address."""

    def __init__(self, address: str, server_name: str) -> None:
        host, _, port = address.rpartition(":")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the certificate has a check of its own
        super().__init__(server_name, int(port), timeout=CONNECT_TIMEOUT * 2, context=context)
        self.local_host = host.strip("[]")

    def connect(self) -> None:
        raw = socket.create_connection((self.local_host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def _get(plan: CheckPlan, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    connection = _LocalHTTPS(plan.tls_address or "", plan.registry_host)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(64 * 1024)
    finally:
        connection.close()


def check_token_round_trip(plan: CheckPlan) -> list[Result]:
    """The token service's health and a token through nginx, verified against the
    registry's bundle and accepted by the registry itself (`GET /v2/`, what `docker
    login` does after its token request)."""
    name = "token round trip"
    if not plan.auth_enabled:
        return [Result(name, SKIP, "the token service is disabled (auth.enable: false).")]
    if plan.tls_address is None:
        return [Result(name, SKIP, "no registry vhost to ask (registry_nginx.enable: false).")]
    try:
        status, body = _get(plan, "/-/health")
        if status != 200:
            return [
                Result(
                    name,
                    FAIL,
                    f"the token service's health answers {status} through nginx.",
                    "appliance-ctl tail auth says why (a database error, say).",
                )
            ]
        status, body = _get(plan, f"/jwt/auth?service={plan.service}")
    except (OSError, http.client.HTTPException) as error:
        return [
            Result(
                name,
                FAIL,
                f"no answer from the registry vhost on {plan.tls_address} ({error}).",
                "appliance-ctl status nginx; appliance-ctl tail nginx says why.",
            )
        ]
    try:
        token = json.loads(body)["token"]
    except (ValueError, KeyError, TypeError):
        return [
            Result(
                name,
                FAIL,
                f"the token endpoint answered {status} without a token.",
                "appliance-ctl tail auth says why.",
            )
        ]
    problem = _token_problem(token, plan)
    if problem:
        return [Result(name, FAIL, problem, "appliance-ctl reconfigure, then run check again.")]
    if not plan.registry_enabled:
        return [Result(name, OK, "token service healthy; its token verifies against the bundle.")]
    try:
        status, body = _get(plan, "/v2/", {"Authorization": f"Bearer {token}"})
    except (OSError, http.client.HTTPException) as error:
        return [
            Result(
                name,
                FAIL,
                f"GET /v2/ through nginx failed ({error}).",
                "appliance-ctl tail nginx says why.",
            )
        ]
    if status != 200:
        return [
            Result(
                name,
                FAIL,
                f"the registry answers {status} to a token of the token service "
                f"({body[:120].decode('utf-8', 'replace').strip()}).",
                "appliance-ctl tail registry says why (untrusted key, issuer, clock).",
            )
        ]
    return [
        Result(
            name,
            OK,
            "token service healthy; a token fetched through nginx verifies against the "
            "registry's bundle and the registry accepts it.",
        )
    ]


def _token_problem(token: str, plan: CheckPlan) -> str:
    """Why the registry would refuse this token ('' when it would not): the signature
    against the bundle (by key ID, as distribution 2.8 looks it up), issuer, audience."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from appliance.auth.tokens import libtrust_key_id

    try:
        header_b64, claims_b64, signature_b64 = token.split(".")
        header = json.loads(_b64decode(header_b64))
        claims = json.loads(_b64decode(claims_b64))
        signature = _b64decode(signature_b64)
    except ValueError:
        return "the token service answered a token that is not a JWT."
    if claims.get("iss") != plan.issuer or claims.get("aud") != plan.service:
        return (
            f"the token's issuer/audience ({claims.get('iss')}/{claims.get('aud')}) are not "
            f"the registry's ({plan.issuer}/{plan.service})."
        )
    try:
        bundle = x509.load_pem_x509_certificates(plan.trusted_bundle.read_bytes())
    except (OSError, ValueError):
        return f"cannot read {plan.trusted_bundle}."
    keys = {libtrust_key_id(cert.public_key()): cert.public_key() for cert in bundle}
    key = keys.get(header.get("kid"))
    if key is None:
        return (
            f"the token's key ID {header.get('kid')} names no certificate of "
            f"{plan.trusted_bundle}: the registry says 'signed by untrusted key'."
        )
    data = f"{header_b64}.{claims_b64}".encode()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            half = len(signature) // 2
            der = encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
            key.verify(der, data, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return (
            f"the token's signature does not verify with its certificate in {plan.trusted_bundle}."
        )
    return ""


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---------------------------------------------------------------- storage


def check_storage(plan: CheckPlan) -> list[Result]:
    name = "storage"
    if not plan.registry_enabled:
        return [Result(name, SKIP, "the bundled registry is disabled (registry.enable: false).")]
    if "filesystem" in plan.storage:
        return [
            _probe_filesystem(Path(plan.storage["filesystem"]["rootdirectory"]), plan.storage_user)
        ]
    if "s3" in plan.storage:
        return [probe_s3(plan.open_storage())]  # type: ignore[arg-type] - s3 opens S3Storage
    driver = next(iter(plan.storage), "?")
    return [
        Result(
            name,
            SKIP,
            f"the {driver} driver is not probed by the appliance (filesystem and s3 are).",
        )
    ]


def _probe_filesystem(root: Path, user: str | None) -> Result:
    """Write, read back and delete a file under the storage root as the registry's
    account (root could write where the registry cannot)."""
    probe = root / f".appliance-check-{os.getpid()}"
    token = os.urandom(8).hex()
    account = user or "this account"
    try:
        done = subprocess.run(
            [
                "/bin/sh",
                "-c",
                'printf %s "$2" > "$1" && cat "$1" && rm -f "$1"',
                "sh",
                str(probe),
                token,
            ],
            capture_output=True,
            text=True,
            timeout=10,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    except (OSError, subprocess.SubprocessError, KeyError) as error:
        return Result(
            "storage",
            FAIL,
            f"cannot run the probe as {account} ({error}).",
            "appliance-ctl reconfigure.",
        )
    if done.returncode != 0 or done.stdout != token:
        problem = " ".join(done.stderr.split()).removeprefix("sh: 1: ") or "no data read back"
        return Result(
            "storage",
            FAIL,
            f"{account} cannot write, read and delete under {root} ({problem}).",
            f"give {account} the directory back (appliance-ctl reconfigure sets its owner "
            f"and mode) or fix the mount (read-only, full).",
        )
    return Result("storage", OK, f"filesystem {root}: {account} writes, reads and deletes.")


def probe_s3(storage: S3Storage) -> Result:
    """HEAD the bucket, PUT, HEAD and DELETE a probe object with the registry's own
    credentials: the guide's 'unexpected 403' is one of these refused."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket = storage.client, storage.bucket
    key = storage._key(f".appliance-check-{os.getpid()}")
    steps = [
        ("HEAD the bucket", lambda: client.head_bucket(Bucket=bucket)),
        (f"PUT {key}", lambda: client.put_object(Bucket=bucket, Key=key, Body=b"check")),
        (f"HEAD {key}", lambda: client.head_object(Bucket=bucket, Key=key)),
        (f"DELETE {key}", lambda: client.delete_object(Bucket=bucket, Key=key)),
    ]
    for what, step in steps:
        try:
            step()
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", "?"))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            if str(status) == "403" or code in ("AccessDenied", "403"):
                fix = (
                    f"let the registry's access key do s3:ListBucket on {bucket} and "
                    f"s3:GetObject, s3:PutObject, s3:DeleteObject on its objects (the "
                    f"guide's sample IAM policy), and check registry.storage.s3.region."
                )
            elif code in ("NoSuchBucket", "404"):
                fix = f"create the bucket {bucket} or correct registry.storage.s3.bucket."
            else:
                fix = "check registry.storage.s3 (endpoint, region, credentials)."
            return Result(
                "storage",
                FAIL,
                f"{storage.description}: {what} refused: {status} {code}.",
                fix,
            )
        except BotoCoreError as error:
            return Result(
                "storage",
                FAIL,
                f"{storage.description}: {what} failed ({error}).",
                "check registry.storage.s3.regionendpoint and that this host reaches it.",
            )
    return Result("storage", OK, f"{storage.description}: HEAD, PUT, HEAD, DELETE answered.")


# ---------------------------------------------------------------- push and pull


def probe_image() -> tuple[bytes, bytes, bytes]:
    """A tiny image, the same bytes every time (its blobs are never duplicated in
    storage, and nothing of a user's image is one of them): layer, config, manifest."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"written by appliance-ctl check\n"
        info = tarfile.TarInfo("appliance-check")
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))
    layer = gzip.compress(buffer.getvalue(), mtime=0)
    diff_id = "sha256:" + hashlib.sha256(buffer.getvalue()).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"org.opencontainers.image.title": "appliance-ctl check"}},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    return layer, config, manifest


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_push_pull(plan: CheckPlan) -> list[Result]:
    """Push the probe image, pull it back and compare, then delete its manifest and
    remove its repository from storage, under the storage lock (so no garbage collection
    or repository deletion runs meanwhile, and none is in its read-only window)."""
    from appliance.registry_storage import StorageError, repository_prefix, storage_lock

    name = "push and pull"
    if not plan.registry_enabled:
        return [Result(name, SKIP, "the bundled registry is disabled (registry.enable: false).")]
    try:
        with storage_lock(plan.storage_lock, "appliance-ctl check"):
            api = plan.registry_api()
            try:
                message = _push_pull(api)
            finally:
                storage = plan.open_storage()
                storage.delete(repository_prefix(CHECK_NAMESPACE))
    except StorageError as error:
        if "busy" in str(error):
            return [Result(name, SKIP, f"not run: {error}")]
        raise
    if message:
        return [Result(name, FAIL, message, "appliance-ctl tail registry says why.")]
    return [
        Result(
            name,
            OK,
            f"a {len(b''.join(probe_image()))}-byte image pushed to {PROBE_REPOSITORY}, "
            f"pulled back identical, and removed.",
        )
    ]


def _push_pull(api: RegistryAPI) -> str:
    """'' when the round trip worked, else what went wrong."""
    layer, config, manifest = probe_image()
    repository = PROBE_REPOSITORY
    for blob in (layer, config):
        api.upload_blob(repository, blob)
    digest = api.put_manifest(
        repository, PROBE_TAG, "application/vnd.oci.image.manifest.v1+json", manifest
    )
    if digest != _digest(manifest):
        return f"the registry stored the manifest as {digest}, not {_digest(manifest)}."
    pulled = api.manifest(repository, PROBE_TAG)
    if pulled is None or pulled.body != manifest:
        return "the pushed manifest does not pull back identical."
    if api.blob(repository, _digest(layer)) != layer:
        return "the pushed layer does not pull back identical."
    try:
        api.delete_manifest(repository, _digest(manifest))
        # Through the API, so the registry's blob descriptor cache forgets the links too
        # (a stale entry would outlive the directory removed after this).
        for blob in (layer, config):
            api.delete_blob(repository, _digest(blob))
    except ApplianceError:
        pass  # deletes disabled: the directory's removal cleans up all the same, and the
        # next probe uploads every blob again rather than trusting what the cache says
    return ""


# ---------------------------------------------------------------- clock


def kernel_synchronized() -> bool | None:
    """Whether the kernel's clock is NTP-disciplined (adjtimex: not TIME_ERROR); None
    where the call is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buffer = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        state = libc.adjtimex(buffer)
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state != 5  # TIME_ERROR


def _date_offset(url: str) -> float:
    """This host's clock minus the Date header of `url`'s server."""
    parts = urlsplit(url)
    scheme = parts.scheme or "https"
    port = parts.port or (443 if scheme == "https" else 80)
    if scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # only its clock is wanted
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", port, timeout=CLOCK_TIMEOUT, context=context
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", port, timeout=CLOCK_TIMEOUT)
    try:
        before = time.time()
        connection.request("HEAD", parts.path or "/")
        response = connection.getresponse()
        after = time.time()
        date = response.getheader("Date")
    finally:
        connection.close()
    if not date:
        raise OSError("no Date header")
    remote = email.utils.parsedate_to_datetime(date).timestamp() + 0.5  # second resolution
    return (before + after) / 2 - remote


def _ntp_offset(server: str) -> float:
    """This host's clock minus an NTP server's (SNTP, one query)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(CLOCK_TIMEOUT)
        udp.connect((server, 123))  # connected: a refusal (ICMP) ends the wait at once
        sent = time.time()
        udp.send(b"\x1b" + 47 * b"\0")
        data = udp.recv(512)
        received = time.time()
    if len(data) < 48:
        raise OSError("short NTP answer")
    seconds, fraction = struct.unpack("!II", data[40:48])
    remote = seconds - 2208988800 + fraction / 2**32
    return (sent + received) / 2 - remote


NTP_CONFIG_FILES = (
    Path("/etc/systemd/timesyncd.conf"),
    Path("/etc/chrony/chrony.conf"),
    Path("/etc/chrony.conf"),
    Path("/etc/ntpsec/ntp.conf"),
    Path("/etc/ntp.conf"),
)
DEFAULT_NTP_SERVER = "pool.ntp.org"


def host_ntp_servers(files: tuple[Path, ...] = NTP_CONFIG_FILES) -> list[str]:
    """The NTP servers this host's time daemon is configured with (timesyncd's NTP= and
    FallbackNTP=, chrony's and ntpd's server and pool lines); pool.ntp.org when none is
    (timesyncd then falls back on a pool too)."""
    servers: list[str] = []
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith(("NTP=", "FallbackNTP=")):
                servers += line.split("=", 1)[1].split()
            elif line.split()[:1] in (["server"], ["pool"]) and len(line.split()) > 1:
                servers.append(line.split()[1])
    return list(dict.fromkeys(servers))[:4] or [DEFAULT_NTP_SERVER]


def check_clock(plan: CheckPlan) -> list[Result]:
    """Ask every time source at once; the first answer decides. None answering within
    CLOCK_TIMEOUT (no network, as in the tests) skips the check with a note."""
    sources: list[tuple[str, Callable[[], float]]] = [
        (f"the Date header of {url}", lambda url=url: _date_offset(url)) for url in plan.clock_urls
    ] + [
        (f"NTP server {server}", lambda server=server: _ntp_offset(server))
        for server in plan.ntp_servers
    ]
    answers: list[tuple[str, float]] = []
    done = threading.Event()
    pending = [len(sources)]
    lock = threading.Lock()

    def ask(label: str, probe: Callable[[], float]) -> None:
        try:
            answers.append((label, probe()))
        except (OSError, ValueError, TypeError, http.client.HTTPException):
            pass
        with lock:
            pending[0] -= 1
            if answers or not pending[0]:
                done.set()  # an answer, or every source has given up

    for label, probe in sources:
        threading.Thread(target=ask, args=(label, probe), daemon=True).start()
    if sources:
        done.wait(CLOCK_TIMEOUT + 0.2)
    if answers:
        label, offset = answers[0]
        return [clock_verdict(offset, label)]
    tried = ", ".join(label.split(" ")[-1] for label, _ in sources) or "none configured"
    synced = kernel_synchronized()
    if synced:
        return [
            Result(
                "clock",
                OK,
                f"the kernel reports the clock NTP-synchronized (no time source answered "
                f"within {CLOCK_TIMEOUT:.0f} s to compare; tried: {tried}).",
            )
        ]
    kernel = (
        "the kernel does not report NTP synchronization: check timedatectl"
        if synced is False
        else "the kernel's NTP state is unknown"
    )
    return [
        Result(
            "clock",
            SKIP,
            f"no time source answered within {CLOCK_TIMEOUT:.0f} s (tried: {tried}); {kernel}.",
        )
    ]


# ---------------------------------------------------------------- disks


def check_disks(plan: CheckPlan) -> list[Result]:
    results = []
    for label, path in plan.disks:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            disk = os.statvfs(existing)
        except OSError as error:
            results.append(Result(f"disk {label}", FAIL, f"cannot read {path}: {error.strerror}."))
            continue
        # f_bavail: what an account other than root may still use (the registry's).
        results.append(
            disk_verdict(label, path, disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize)
        )
    return results
