"""`appliance-ctl check`'s pure parts: verdicts on figures as tables (disk space,
certificate days and problems, clock offsets), the lines and the JSON a monitor reads,
the exit decision, the probe image, the host's NTP servers; and the clock compared
with a Date header from a server on this host (the network part of the tests can
reach nothing else)."""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance import check
from appliance.check import FAIL, OK, SKIP, WARN, Report, Result

GIB = 1024**3


@pytest.mark.parametrize(
    ("free", "total", "status"),
    [
        (50 * GIB, 100 * GIB, OK),
        (10 * GIB, 100 * GIB, OK),  # exactly 10 %: not under it
        (9.9 * GIB, 100 * GIB, WARN),
        (2 * GIB, 100 * GIB, WARN),
        (1.9 * GIB, 100 * GIB, FAIL),
        (0, 100 * GIB, FAIL),
        (0, 0, FAIL),  # a file system that reports nothing is treated as full
    ],
)
def test_disk_thresholds(free, total, status) -> None:
    result = check.disk_verdict("storage", Path("/srv/registry"), int(free), int(total))
    assert result.status == status
    assert result.check == "disk storage"
    assert bool(result.fix) == (status != OK)
    if status != OK:
        assert "free space on the file system of /srv/registry" in result.fix


def test_disk_message_says_how_much() -> None:
    result = check.disk_verdict("logs", Path("/var/log/appliance"), 5 * GIB, 100 * GIB)
    assert result.message == ("/var/log/appliance: 5 GiB free of 100 GiB (5%), under 10%.")


@pytest.mark.parametrize(
    ("problems", "days", "self_signed", "mode", "status", "words"),
    [
        ([], 80, False, "letsencrypt", OK, "valid for 80 more days."),
        ([], 800, True, "self-signed", OK, "self-signed: clients must trust this file"),
        ([], 13.5, False, "letsencrypt", WARN, "expires in 13 days"),
        ([], 14, False, "files", OK, "valid for 14 more days"),
        ([], 3, False, "files", WARN, "expires in 3 days"),
        (
            ["The certificate for CN=x expired on 2026-01-01 00:00 UTC."],
            -3,
            False,
            "files",
            FAIL,
            "expired",
        ),
        (
            ["The certificate does not cover registry.example.com (it covers: x)."],
            50,
            False,
            "files",
            FAIL,
            "does not cover",
        ),
        ([], 80, True, "letsencrypt", FAIL, "self-signed placeholder"),
    ],
)
def test_certificate_verdicts(problems, days, self_signed, mode, status, words) -> None:
    result = check.certificate_verdict(problems, days, self_signed, mode, Path("/etc/x.crt"))
    assert result.status == status
    assert words in result.message
    assert bool(result.fix) == (status != OK)


def test_a_bad_certificate_file_of_the_admin_is_fixed_by_the_admin() -> None:
    result = check.certificate_verdict(["expired"], -1, False, "files", Path("/etc/x.crt"))
    assert (
        result.fix
        == "install a valid certificate and key at /etc/x.crt and run appliance-ctl reconfigure."
    )
    result = check.certificate_verdict(["expired"], -1, True, "self-signed", Path("/etc/x.crt"))
    assert result.fix.startswith("appliance-ctl renew-certs --force")


@pytest.mark.parametrize(
    ("offset", "status", "words"),
    [
        (0.4, OK, "0.4 s ahead of NTP server n"),
        (-10.0, OK, "10.0 s behind"),
        (-10.5, WARN, "10.5 s behind"),
        (59.0, WARN, "59.0 s ahead"),
        (61.0, FAIL, "more than the registry's 60 s leeway"),
        (-3600.0, FAIL, "3600.0 s behind"),
    ],
)
def test_clock_thresholds(offset, status, words) -> None:
    result = check.clock_verdict(offset, "NTP server n")
    assert (result.status, result.check) == (status, "clock")
    assert words in result.message
    assert bool(result.fix) == (status != OK)


def test_lines_summary_and_exit_decision() -> None:
    report = Report(
        [
            Result("service nginx", OK, "running."),
            Result("disk logs", WARN, "/var/log: 5 % free.", "free space."),
            Result("clock", SKIP, "no time source answered."),
        ],
        0.8412,
    )
    assert not report.failed
    assert report.text().splitlines() == [
        "ok    service nginx: running.",
        "warn  disk logs: /var/log: 5 % free. Fix: free space.",
        "skip  clock: no time source answered.",
        "check: 1 ok, 1 warn, 1 skip in 0.84 s",
    ]
    failed = Report([*report.results, Result("storage", FAIL, "cannot write.", "chown it.")], 1.0)
    assert failed.failed
    assert failed.text().splitlines()[-2] == "FAIL  storage: cannot write. Fix: chown it."
    document = json.loads(failed.to_json())
    assert document["ok"] is False
    assert document["counts"] == {"ok": 1, "warn": 1, "FAIL": 1, "skip": 1}
    assert document["checks"][3] == {
        "check": "storage",
        "status": "FAIL",
        "message": "cannot write.",
        "fix": "chown it.",
    }


def test_an_appliance_error_in_a_check_is_its_failure() -> None:
    from appliance.registry_api import RegistryAPIError

    def check_push_pull(plan):
        raise RegistryAPIError("the registry refused to store a manifest: 500 boom")

    [result] = check._guarded(check_push_pull, None)
    assert result == Result(
        "push and pull",
        FAIL,
        "the registry refused to store a manifest: 500 boom",
        "appliance-ctl tail registry says why.",
    )


def test_the_probe_image_is_the_same_valid_image_every_time() -> None:
    layer, config, manifest = check.probe_image()
    assert (layer, config, manifest) == check.probe_image()
    document = json.loads(manifest)
    assert document["config"]["digest"] == "sha256:" + hashlib.sha256(config).hexdigest()
    assert document["layers"][0]["digest"] == "sha256:" + hashlib.sha256(layer).hexdigest()
    assert document["layers"][0]["size"] == len(layer)
    assert len(layer + config + manifest) < 2048


def test_the_probe_repository_is_no_users_or_projects() -> None:
    from appliance.auth.names import is_repository_name, path_problem

    assert is_repository_name(check.PROBE_REPOSITORY)  # the registry takes it
    namespace = check.PROBE_REPOSITORY.split("/")[0]
    assert "double hyphen" in path_problem(namespace)  # no username or project can be it


def test_ntp_servers_from_the_hosts_time_daemon(tmp_path: Path) -> None:
    timesyncd = tmp_path / "timesyncd.conf"
    timesyncd.write_text(
        "[Time]\n#NTP=\nNTP=ntp1.example.org ntp2.example.org\n#FallbackNTP=0.debian.pool.ntp.org\n"
    )
    chrony = tmp_path / "chrony.conf"
    chrony.write_text(
        "pool 2.debian.pool.ntp.org iburst\n# server commented\nserver ntp1.example.org\n"
    )
    assert check.host_ntp_servers((timesyncd, chrony, tmp_path / "missing")) == [
        "ntp1.example.org",
        "ntp2.example.org",
        "2.debian.pool.ntp.org",
    ]
    assert check.host_ntp_servers((tmp_path / "missing",)) == ["pool.ntp.org"]


class _SkewedDate(BaseHTTPRequestHandler):
    skew = 0.0

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self.send_response_only(200)  # send_response would add a Date of its own
        self.send_header("Date", email.utils.formatdate(time.time() + self.skew, usegmt=True))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def date_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SkewedDate)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("skew", "status"), [(0, OK), (-300, FAIL), (30, WARN)])
def test_clock_against_a_configured_upstreams_date(date_server, skew, status) -> None:
    _SkewedDate.skew = skew
    url = f"http://127.0.0.1:{date_server.server_port}/directory"
    [result] = check.check_clock(SimpleNamespace(clock_urls=[url], ntp_servers=[]))
    assert result.status == status, result
    assert f"the Date header of {url}" in result.message
    if skew < 0:
        assert "ahead of" in result.message  # the upstream is behind: this host is ahead


def test_no_time_source_skips_quickly_with_a_note() -> None:
    started = time.monotonic()
    [result] = check.check_clock(
        SimpleNamespace(clock_urls=["http://127.0.0.1:9/"], ntp_servers=["127.0.0.1"])
    )
    assert time.monotonic() - started < check.CLOCK_TIMEOUT + 0.5
    assert result.status in (SKIP, OK)  # OK only where the kernel says NTP keeps the clock
    assert "tried: http://127.0.0.1:9/, 127.0.0.1" in result.message


def test_certificate_days_use_the_real_clock() -> None:
    """Guard against a naive datetime sneaking into the days arithmetic."""
    from appliance import pki

    key = pki.generate_private_key()
    pem = pki.self_signed_certificate(key, ["localhost"], days=30)
    info = pki.certificate_info(pem)
    days = (info.not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    assert 29 < days <= 30


@pytest.mark.parametrize(
    ("host", "status", "words"),
    [
        ("localhost", OK, "resolves to"),
        ("127.0.0.1", OK, "resolves to 127.0.0.1."),
        ("192.0.2.7", WARN, "none of them an address of this host"),  # TEST-NET-1
        ("bad..name", FAIL, "does not resolve on this host"),
    ],
)
def test_the_registry_name_resolves_to_this_host(host, status, words) -> None:
    result = check._resolves(host)
    assert (result.check, result.status) == (f"name {host}", status)
    assert words in result.message
    assert bool(result.fix) == (status != OK)


def _issued(subject: str, key, issuer_name: str, issuer_key) -> object:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(issuer_key, hashes.SHA256())
    )


def test_the_chain_must_be_in_order() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, leaf_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _issued("Example CA", ca_key, "Example CA", ca_key)
    leaf = _issued("registry.example.com", leaf_key, "Example CA", ca_key)
    other = _issued("Other CA", other_key, "Other CA", other_key)
    assert check._chain_problems([leaf, ca]) == []
    assert check._chain_problems([leaf]) == []
    [problem] = check._chain_problems([leaf, other])
    assert problem.startswith(
        "The chain is out of order or incomplete: CN=registry.example.com is not issued by "
        "CN=Other CA"
    )
    assert check._chain_problems([ca, leaf])  # intermediates before the server certificate


def test_the_probes_registry_events_are_not_recorded() -> None:
    """The registry notifies the token service of the probe's push, pull and delete like
    any other; history and usage leave them out (they are no user's)."""
    from appliance.auth import events
    from tests.unit.test_usage_quota import MANIFEST, envelope, event

    body = envelope(
        event(
            "push",
            "application/octet-stream",
            digest="sha256:aa",
            size=10,
            repository=check.PROBE_REPOSITORY,
        ),
        event(
            "push",
            MANIFEST,
            digest="sha256:bb",
            size=20,
            repository=check.PROBE_REPOSITORY,
            tag="probe",
        ),
        event("push", MANIFEST, digest="sha256:cc", size=30, repository="team/app", tag="v1"),
    )
    parsed = events.parse(body)
    assert [e.repository for e in parsed.manifests] == ["team/app"]
    assert [b[0] for b in parsed.pushed_blobs] == ["team/app"]


def test_a_failed_janitor_run_warns_until_one_succeeds(tmp_path: Path) -> None:
    state = tmp_path / "janitor.json"
    plan = SimpleNamespace(janitor_state=state)
    [result] = check.check_janitor(plan)
    assert (result.status, result.message) == (OK, "no scheduled run yet.")
    started, upcoming = 1_800_000_000, 1_800_086_400
    failed = "retention failed: the registry does not answer"
    state.write_text(json.dumps({"last": {"started": started, "result": failed}, "next": upcoming}))
    [result] = check.check_janitor(plan)
    assert result.status == WARN
    assert result.message == (
        f"the last run (2027-01-15 08:00:00 UTC) ended with: {failed}."
        " The next run is at 2027-01-16 08:00:00 UTC."
    )
    assert result.fix.startswith("appliance-ctl tail janitor says why")
    state.write_text(json.dumps({"last": {"started": upcoming, "result": "ok"}}))
    [result] = check.check_janitor(plan)
    assert (result.status, result.message) == (
        OK,
        "the last run (2027-01-16 08:00:00 UTC) succeeded.",
    )
    assert check.check_janitor(SimpleNamespace(janitor_state=None)) == []  # janitor off


def test_an_auth_database_with_no_schema_fails_and_says_reconfigure(tmp_path: Path) -> None:
    database = tmp_path / "auth.db"
    [result] = check.check_database(SimpleNamespace(database=database))
    assert result == Result(
        "auth database",
        FAIL,
        f"SQLite {database} holds no schema yet: the token service cannot start on it.",
        "run appliance-ctl reconfigure (it creates the schema).",
    )
    assert not database.exists()  # asking created nothing
    assert check.check_database(SimpleNamespace(database=None)) == []  # no token service


def test_a_damaged_auth_database_is_one_sentence_not_a_traceback(tmp_path: Path) -> None:
    database = tmp_path / "auth.db"
    database.write_bytes(b"not a database, but a file in its place\n" * 100)
    [result] = check._guarded(check.check_database, SimpleNamespace(database=database))
    assert result == Result(
        "auth database",
        FAIL,
        f"The auth database {database} cannot be read: file is not a database; restore it"
        " from a backup (appliance-ctl restore).",
    )
