"""The TLS recipe's decisions, as tables: which mode a config gets, which admin files are
refused before anything changes, when a Let's Encrypt order is placed, and which
certificate change reloads nginx. No processes: files under a temporary root only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.server
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import certificates, letsencrypt, pki, settings
from appliance.engine import Engine
from appliance.errors import ConfigError
from appliance.programs import renewer as renewer_program
from appliance.resources import Absent, CertificateState, SelfSignedCertificate, Template, reload
from recipes import tls

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
KEY = pki.generate_private_key("ec-p256")
OTHER_KEY = pki.generate_private_key("ec-p256")
CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])


def issued_by_ca(
    names: list[str], not_before: dt.datetime = NOW - DAY, days: int = 90, key_pem: bytes = KEY
) -> bytes:
    """A leaf + CA chain, as Let's Encrypt or a commercial CA hands it out."""
    key = serialization.load_pem_private_key(key_pem, None)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(CA_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + days * DAY)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(CA_KEY, hashes.SHA256())
    )
    return leaf.public_bytes(serialization.Encoding.PEM)


def load(tmp_path: Path, data: dict) -> settings.Settings:
    path = tmp_path / "etc/appliance/appliance.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    # pytest's deep temporary roots leave no room for the auth socket's path (107 bytes);
    # these tests are about certificates, so the token service listens on TCP.
    data = {"auth": {"listen_network": "tcp"}, **data}
    path.write_text(yaml.safe_dump({"root": str(tmp_path), **data}))
    loaded = settings.load(path, must_exist=True)
    loaded.paths.ssl_dir.mkdir(exist_ok=True)  # the base recipe's
    return loaded


# --- mode selection ----------------------------------------------------------------------

FILES = {"ssl_certificate": "/etc/ssl/registry.crt", "ssl_certificate_key": "/etc/ssl/r.key"}


@pytest.mark.parametrize(
    "config, mode, host, port",
    [
        pytest.param({}, "self-signed", "localhost", 5050, id="default-localhost"),
        pytest.param(
            {"external_url": "https://gitlab.example.com"},
            "letsencrypt",
            "gitlab.example.com",
            5050,
            id="public-name-port-5050",
        ),
        pytest.param(
            {
                "external_url": "https://gitlab.example.com",
                "registry_external_url": "https://registry.example.com",
            },
            "letsencrypt",
            "registry.example.com",
            443,
            id="registry-on-own-domain",
        ),
        pytest.param(
            {
                "external_url": "https://gitlab.example.com",
                "registry_external_url": "https://registry.example.local",
            },
            "self-signed",
            "registry.example.local",
            443,
            id="own-domain-not-public",
        ),
        pytest.param(
            {"external_url": "https://10.1.2.3"}, "self-signed", "10.1.2.3", 5050, id="ip-address"
        ),
        pytest.param(
            {"external_url": "https://registry.test"},
            "self-signed",
            "registry.test",
            5050,
            id="dot-test",
        ),
        pytest.param(
            {"external_url": "https://registry"}, "self-signed", "registry", 5050, id="single-label"
        ),
        pytest.param(
            {"external_url": "https://gitlab.example.com", "registry_nginx": FILES},
            "files",
            "gitlab.example.com",
            5050,
            id="certificate-files-turn-lets-encrypt-off",
        ),
        pytest.param(
            {"external_url": "https://localhost", "registry_nginx": FILES},
            "files",
            "localhost",
            5050,
            id="certificate-files-for-localhost",
        ),
        pytest.param(
            {"external_url": "https://gitlab.example.com", "letsencrypt": {"enable": False}},
            "self-signed",
            "gitlab.example.com",
            5050,
            id="enable-false-overrides",
        ),
        pytest.param(
            {"external_url": "https://registry.test", "letsencrypt": {"enable": True}},
            "letsencrypt",
            "registry.test",
            5050,
            id="enable-true-overrides",
        ),
        pytest.param(
            {
                "external_url": "https://gitlab.example.com",
                "letsencrypt": {"enable": False},
                "registry_nginx": FILES,
            },
            "files",
            "gitlab.example.com",
            5050,
            id="files-with-enable-false",
        ),
    ],
)
def test_mode_selection(tmp_path, config, mode, host, port):
    s = load(tmp_path, config)
    assert (s.tls_mode, s.registry_host, s.registry_port) == (mode, host, port)
    cert, key = certificates.certificate_paths(s)
    if mode == "files":
        assert (str(cert), str(key)) == (FILES["ssl_certificate"], FILES["ssl_certificate_key"])
    else:
        assert cert == tmp_path / f"etc/appliance/ssl/{host}.crt"
        assert key == tmp_path / f"etc/appliance/ssl/{host}.key"


def test_lets_encrypt_forced_on_with_certificate_files_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load(
            tmp_path,
            {
                "external_url": "https://gitlab.example.com",
                "letsencrypt": {"enable": True},
                "registry_nginx": FILES,
            },
        )
    assert any(
        p.startswith("letsencrypt.enable: true conflicts with registry_nginx.ssl_certificate")
        for p in raised.value.problems
    )


# --- preflight of the admin's files ------------------------------------------------------


def files_settings(
    tmp_path: Path,
    cert: bytes | None,
    key: bytes | None,
    registry_url: str = "https://registry.example.com",
) -> settings.Settings:
    cert_path, key_path = tmp_path / "ssl/registry.crt", tmp_path / "ssl/registry.key"
    cert_path.parent.mkdir(exist_ok=True)
    for path, content in ((cert_path, cert), (key_path, key)):
        if content is not None:
            path.write_bytes(content)
    return load(
        tmp_path,
        {
            "external_url": "https://gitlab.example.com",
            "registry_external_url": registry_url,
            "registry_nginx": {
                "ssl_certificate": str(cert_path),
                "ssl_certificate_key": str(key_path),
            },
        },
    )


GOOD = issued_by_ca(["registry.example.com"])
CRT = "registry_nginx.ssl_certificate: {root}/ssl/registry.crt: "


@pytest.mark.parametrize(
    "cert, key, expected",
    [
        pytest.param(GOOD, KEY, [], id="good"),
        pytest.param(issued_by_ca(["*.example.com"]), KEY, [], id="wildcard-covers-registry"),
        pytest.param(GOOD + issued_by_ca(["Test CA"]), KEY, [], id="chain-leaf-first"),
        pytest.param(
            issued_by_ca(["registry.example.com"], not_before=NOW - 100 * DAY),
            KEY,
            [CRT + "The certificate for CN=registry.example.com expired on 2026-05-22 12:00 UTC."],
            id="expired",
        ),
        pytest.param(
            issued_by_ca(["gitlab.example.com"]),
            KEY,
            [
                CRT + "The certificate does not cover registry.example.com (it covers: "
                "gitlab.example.com)."
            ],
            id="wrong-host",
        ),
        pytest.param(
            issued_by_ca(["*.gitlab.example.com"]),
            KEY,
            [
                CRT + "The certificate does not cover registry.example.com (it covers: "
                "*.gitlab.example.com)."
            ],
            id="wildcard-of-another-domain",
        ),
        pytest.param(
            GOOD,
            OTHER_KEY,
            [CRT + "The private key does not match the certificate for CN=registry.example.com."],
            id="key-mismatch",
        ),
        pytest.param(
            issued_by_ca(["old.example.com"], not_before=NOW - 100 * DAY),
            OTHER_KEY,
            [
                CRT + "The private key does not match the certificate for CN=old.example.com.",
                CRT + "The certificate for CN=old.example.com expired on 2026-05-22 12:00 UTC.",
                CRT + "The certificate does not cover registry.example.com (it covers: "
                "old.example.com).",
            ],
            id="every-problem-at-once",
        ),
        pytest.param(
            None,
            KEY,
            [
                "registry_nginx.ssl_certificate: {root}/ssl/registry.crt does "
                "not exist or is not a file"
            ],
            id="missing-certificate",
        ),
        pytest.param(
            None,
            None,
            [
                "registry_nginx.ssl_certificate: {root}/ssl/registry.crt does not exist "
                "or is not a file",
                "registry_nginx.ssl_certificate_key: {root}/ssl/registry.key does not "
                "exist or is not a file",
            ],
            id="both-missing",
        ),
        pytest.param(
            b"garbage",
            KEY,
            [CRT + "The certificate file holds no readable PEM certificate."],
            id="not-pem",
        ),
    ],
)
def test_preflight_of_certificate_files(tmp_path, cert, key, expected):
    s = files_settings(tmp_path, cert, key)
    assert s.tls_mode == "files"
    if not expected:
        tls.preflight(s, now=NOW)
        return
    with pytest.raises(ConfigError) as raised:
        tls.preflight(s, now=NOW)
    assert raised.value.problems == [p.format(root=tmp_path) for p in expected]
    count = len(expected)
    assert str(raised.value) == (
        f"the certificate files cannot be used: {count} "
        f"problem{'s' * (count > 1)}; nothing was changed."
    )


def test_preflight_checks_the_registry_host_not_the_main_one(tmp_path):
    """The registry vhost is the only TLS vhost: a certificate for the main host alone
    would be served to registry clients, who would refuse it."""
    s = files_settings(tmp_path, issued_by_ca(["gitlab.example.com"]), KEY)
    with pytest.raises(ConfigError) as raised:
        tls.preflight(s, now=NOW)
    assert "does not cover registry.example.com" in raised.value.problems[0]


def test_preflight_skips_files_when_the_registry_vhost_is_off(tmp_path):
    s = files_settings(tmp_path, None, None)
    s = dataclasses.replace(s, registry_nginx=dataclasses.replace(s.registry_nginx, enable=False))
    tls.preflight(s, now=NOW)


def test_preflight_refuses_lets_encrypt_for_an_ip_address(tmp_path):
    s = load(tmp_path, {"external_url": "https://10.1.2.3", "letsencrypt": {"enable": True}})
    with pytest.raises(ConfigError) as raised:
        tls.preflight(s)
    assert raised.value.problems[0].startswith(
        "letsencrypt.enable: Let's Encrypt does not issue certificates for the IP address "
        "10.1.2.3; "
    )


# --- when a Let's Encrypt order is placed ------------------------------------------------


def acme(
    tmp_path: Path, force: bool = False, domains: tuple[str, ...] = ("registry.test",)
) -> certificates.AcmeCertificate:
    return certificates.AcmeCertificate(
        tmp_path / "registry.test.crt",
        tmp_path / "registry.test.key",
        list(domains),
        directory_url="https://acme.invalid/dir",
        account_key_pem=b"unused",
        webroot=tmp_path / "webroot",
        contact_emails=[],
        ca_bundle=None,
        key_type="ec-p256",
        renew_before=30 * DAY,
        force=force,
        now=NOW,
        notifies=(reload("nginx"),),
    )


PLACEHOLDER = pki.self_signed_certificate(KEY, ["registry.test"], days=90, now=NOW - DAY)
ORDER = "order from https://acme.invalid/dir: "


@pytest.mark.parametrize(
    "cert, key, force, expected",
    [
        pytest.param(None, None, False, "no certificate yet", id="missing"),
        pytest.param(
            issued_by_ca(["registry.test"]), None, False, "no certificate yet", id="key-missing"
        ),
        pytest.param(
            PLACEHOLDER,
            KEY,
            False,
            "the current certificate is a self-signed placeholder",
            id="placeholder",
        ),
        pytest.param(
            issued_by_ca(["registry.test"], not_before=NOW - 70 * DAY),
            KEY,
            False,
            "within the renewal window: expires in 20 days",
            id="due",
        ),
        pytest.param(
            issued_by_ca(["registry.test"], not_before=NOW - 95 * DAY),
            KEY,
            False,
            "expired on 2026-05-27 12:00 UTC",
            id="expired",
        ),
        pytest.param(
            issued_by_ca(["registry.test"], not_before=NOW - 50 * DAY),
            KEY,
            False,
            None,
            id="not-due",
        ),
        pytest.param(issued_by_ca(["registry.test"]), KEY, False, None, id="fresh"),
        pytest.param(
            issued_by_ca(["old.test"]),
            KEY,
            False,
            "names changed: registry.test not covered (certificate covers: old.test)",
            id="names-changed",
        ),
        pytest.param(
            issued_by_ca(["registry.test"]),
            OTHER_KEY,
            False,
            "the key does not match the certificate",
            id="key-mismatch",
        ),
        pytest.param(
            b"garbage",
            KEY,
            False,
            "The certificate file holds no readable PEM certificate.",
            id="unreadable",
        ),
        pytest.param(issued_by_ca(["registry.test"]), KEY, True, "renewal forced", id="forced"),
        pytest.param(None, None, True, "renewal forced", id="forced-missing"),
    ],
)
def test_acme_certificate_plan(tmp_path, cert, key, force, expected):
    resource = acme(tmp_path, force=force)
    changes = resource.plan(CertificateState(cert, key))
    assert [c.summary for c in changes] == ([] if expected is None else [ORDER + expected])


def test_acme_certificate_reads_its_files(tmp_path):
    resource = acme(tmp_path)
    assert resource.current() == CertificateState(None, None)
    resource.cert_path.write_bytes(GOOD)
    assert resource.current() == CertificateState(GOOD, None)


def test_a_failed_order_keeps_the_certificate_and_says_so(tmp_path):
    """No CA answers (a closed port): nothing is written, the error names the host."""
    resource = acme(tmp_path)
    resource.directory_url = f"https://127.0.0.1:{closed_port()}/dir"
    resource.account_key_pem = letsencrypt.generate_account_key()
    old = issued_by_ca(["registry.test"], not_before=NOW - 80 * DAY)
    resource.cert_path.write_bytes(old)
    resource.key_path.write_bytes(KEY)
    lines: list[str] = []
    report = Engine(lines.append).converge([resource])
    assert report.failed is not None
    assert "(needed for registry.test): Connection refused" in report.failed.error
    assert report.failed.error.endswith(
        f"The certificate in place ({resource.cert_path}) was kept and is still served."
    )
    assert report.notifications == []
    assert resource.cert_path.read_bytes() == old and resource.key_path.read_bytes() == KEY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.test.crt", "registry.test.key"]


def closed_port() -> int:
    from tests.support.pebble import free_port

    return free_port()


# --- the placeholder nginx starts on -----------------------------------------------------


@pytest.mark.parametrize(
    "cert, key, expected",
    [
        pytest.param(None, None, "no certificate yet", id="missing"),
        pytest.param(PLACEHOLDER, None, "no certificate yet", id="key-missing"),
        pytest.param(
            issued_by_ca(["registry.test"]),
            OTHER_KEY,
            "the key does not match the certificate",
            id="key-mismatch",
        ),
        pytest.param(PLACEHOLDER, KEY, None, id="placeholder-kept"),
        pytest.param(issued_by_ca(["registry.test"]), KEY, None, id="issued-never-replaced"),
        pytest.param(
            issued_by_ca(["registry.test"], not_before=NOW - 100 * DAY),
            KEY,
            None,
            id="expired-issued-left-to-the-order",
        ),
    ],
)
def test_placeholder_plan(tmp_path, cert, key, expected):
    placeholder = certificates.PlaceholderCertificate(
        tmp_path / "c.crt", tmp_path / "c.key", ["registry.test"]
    )
    changes = placeholder.plan(CertificateState(cert, key))
    assert [c.summary for c in changes] == (
        []
        if expected is None
        else [f"create placeholder until Let's Encrypt issues one ({expected})"]
    )


# --- which resources each mode declares, and what they notify ----------------------------


def converge(resources: list) -> tuple[list[str], list]:
    lines: list[str] = []
    report = Engine(lines.append).converge(resources)
    assert report.failed is None, lines
    return [line for line in lines if line.startswith("+")], report.notifications


def test_files_mode_reloads_nginx_when_the_certificate_content_changes(tmp_path):
    s = files_settings(tmp_path, GOOD, KEY)
    cert_path, key_path = certificates.certificate_paths(s)

    changed, notifications = converge(tls.certificate_resources(s))
    assert changed[-1] == f"+ file {tls.fingerprint_path(s)} (created)"
    assert notifications == [reload("nginx")]

    changed, notifications = converge(tls.certificate_resources(s))
    assert (changed, notifications) == ([], [])

    cert_path.write_bytes(issued_by_ca(["registry.example.com"]))  # renewed, same key
    changed, notifications = converge(tls.certificate_resources(s))
    assert changed == [f"+ file {tls.fingerprint_path(s)} (updated: update content)"]
    assert notifications == [reload("nginx")]

    new_key = pki.generate_private_key("ec-p256")  # a new key pair
    key_path.write_bytes(new_key)
    cert_path.write_bytes(issued_by_ca(["registry.example.com"], key_pem=new_key))
    assert converge(tls.certificate_resources(s))[1] == [reload("nginx")]
    # The admin's files are read, never written.
    assert cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert key_path.read_bytes() == new_key


def test_files_mode_never_writes_to_the_admins_files(tmp_path):
    s = files_settings(tmp_path, GOOD, KEY)
    kinds = {type(r).__name__ for r in tls.certificate_resources(s)}
    assert not kinds & {"SelfSignedCertificate", "PlaceholderCertificate", "AcmeCertificate"}
    assert tls.late_resources(s, secrets=None) == []


def test_self_signed_is_generated_once_and_reused(tmp_path):
    s = load(tmp_path, {"external_url": "https://localhost"})
    changed, notifications = converge(tls.certificate_resources(s))
    cert_path, key_path = certificates.certificate_paths(s)
    assert f"+ certificate {cert_path} (updated: create self-signed for localhost)" in changed
    assert notifications == [reload("nginx")]
    first = cert_path.read_bytes()
    assert converge(tls.certificate_resources(s)) == ([], [])
    assert cert_path.read_bytes() == first
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    assert tls.late_resources(s, secrets=None) == []


def test_self_signed_is_renewed_within_the_window(tmp_path):
    s = load(tmp_path, {"external_url": "https://localhost"})
    cert_path, key_path = certificates.certificate_paths(s)
    key_path.write_bytes(KEY)
    cert_path.write_bytes(
        pki.self_signed_certificate(
            KEY, ["localhost"], days=825, now=dt.datetime.now(dt.UTC) - 800 * DAY
        )
    )
    [certificate] = [
        r for r in tls.certificate_resources(s) if isinstance(r, SelfSignedCertificate)
    ]
    assert [c.summary for c in certificate.plan(certificate.current())] == [
        "regenerate: within the renewal window: expires in 24 days"
    ]
    converge([certificate])
    info = pki.certificate_info(cert_path.read_bytes())
    assert info.not_after - dt.datetime.now(dt.UTC) > 800 * DAY


def test_lets_encrypt_starts_on_a_placeholder_and_orders_late(tmp_path):
    s = load(
        tmp_path,
        {
            "external_url": "https://gitlab.example.com",
            "registry_external_url": "https://registry.example.com",
            "letsencrypt": {"contact_emails": ["ops@example.com"], "renew_before_days": 20},
        },
    )
    changed, notifications = converge(tls.certificate_resources(s))
    cert_path, _ = certificates.certificate_paths(s)
    assert cert_path == tmp_path / "etc/appliance/ssl/registry.example.com.crt"
    assert pki.certificate_info(cert_path.read_bytes()).self_signed
    assert notifications == [reload("nginx")]

    secrets = type("Secrets", (), {"letsencrypt_account_key": "PEM"})()
    [order] = tls.late_resources(s, secrets)
    assert isinstance(order, certificates.AcmeCertificate)
    assert order.domains == ["registry.example.com"]  # its own certificate, not the main host
    assert order.contact_emails == ["ops@example.com"]
    assert order.renew_before == 20 * DAY
    assert order.webroot == tmp_path / "var/opt/appliance/nginx/acme-webroot"
    assert order.notifies == (reload("nginx"),)
    assert order.plan(order.current())[0].summary.endswith("self-signed placeholder")


def test_the_webroot_exists_for_nginx_and_keeps_no_leftover_token(tmp_path):
    s = load(tmp_path, {"external_url": "https://gitlab.example.com"})
    converge(tls.certificate_resources(s))
    challenges = s.paths.acme_webroot / ".well-known/acme-challenge"
    assert challenges.is_dir()
    for path in (s.paths.acme_webroot, challenges.parent, challenges):
        assert path.stat().st_mode & 0o755 == 0o755  # nginx workers run as another user
    (challenges / "left-by-a-killed-order").write_text("x")
    changed, notifications = converge(tls.certificate_resources(s))
    assert changed == [
        f"+ challenge tokens {challenges} (updated: remove 1 left by an interrupted order)"
    ]
    assert notifications == []
    assert list(challenges.iterdir()) == []


@pytest.mark.parametrize(
    "config, renewer",
    [
        ({"external_url": "https://gitlab.example.com"}, True),
        ({"external_url": "https://localhost"}, True),
        (
            {"external_url": "https://gitlab.example.com", "letsencrypt": {"auto_renew": False}},
            False,
        ),
        ({"external_url": "https://gitlab.example.com", "registry_nginx": FILES}, False),
        ({"external_url": "https://gitlab.example.com", "registry": {"enable": False}}, False),
    ],
)
def test_the_renewer_runs_where_there_is_something_to_renew(tmp_path, config, renewer):
    s = load(tmp_path, config)
    items = tls.renewer_resources(s)
    program = s.paths.supervisor_dir / "conf.d/renewer.conf"
    if not renewer:
        assert [(type(r), r.path) for r in items] == [(Absent, program)]
        return
    [template] = [r for r in items if isinstance(r, Template)]
    assert template.path == program
    assert f"-m appliance.programs.renewer {s.paths.config_file}\n" in template.content.decode()


def test_a_forced_renewal_regenerates_a_self_signed_certificate(tmp_path):
    s = load(tmp_path, {"external_url": "https://localhost"})
    converge(tls.certificate_resources(s))
    cert_path, _ = certificates.certificate_paths(s)
    first = cert_path.read_bytes()
    changed, notifications = converge(tls.renewal_resources(s, None, force=True))
    assert cert_path.read_bytes() != first
    assert notifications == [reload("nginx")]
    assert converge(tls.renewal_resources(s, None, force=False)) == ([], [])


@pytest.mark.parametrize(
    "addresses, expected",
    [
        (["*"], "127.0.0.1:8080"),
        (["[::]"], "[::1]:8080"),
        (["192.0.2.10", "*"], "192.0.2.10:8080"),
        (["::1"], "[::1]:8080"),
    ],
)
def test_the_webroot_is_checked_where_nginx_listens(tmp_path, addresses, expected):
    s = load(tmp_path, {"nginx": {"http_port": 8080, "listen_addresses": addresses}})
    assert tls.webroot_url(s) == expected


# --- the pre-order check of the webroot --------------------------------------------------


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(301)
        self.send_header("Location", "https://registry.test/")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webroot_check_names_a_redirect_in_front_of_the_challenge(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(letsencrypt.IssuanceError) as raised:
            certificates.wait_for_webroot(
                tmp_path, f"127.0.0.1:{server.server_port}", "registry.test", timeout=0.3
            )
    finally:
        server.shutdown()
        server.server_close()
    assert str(raised.value).startswith(
        f"nginx does not serve the ACME challenge for registry.test: http://127.0.0.1:"
        f"{server.server_port}/.well-known/acme-challenge/ it answered 301 Moved "
        f"Permanently (redirect to https://registry.test/)."
    )
    assert list((tmp_path / ".well-known/acme-challenge").iterdir()) == []


def test_webroot_check_passes_when_the_webroot_is_served(tmp_path):
    from tests.support.pebble import WebrootServer, free_port

    port = free_port()
    with WebrootServer(tmp_path, port):
        certificates.wait_for_webroot(tmp_path, f"127.0.0.1:{port}", "registry.test", timeout=2)
    assert list((tmp_path / ".well-known/acme-challenge").iterdir()) == []


def test_webroot_check_gives_up_on_a_closed_port(tmp_path):
    port = closed_port()
    with pytest.raises(letsencrypt.IssuanceError) as raised:
        certificates.wait_for_webroot(tmp_path, f"127.0.0.1:{port}", "registry.test", timeout=0.3)
    assert "cannot connect: Connection refused" in str(raised.value)
    assert "appliance-ctl status nginx" in str(raised.value)


# --- a certificate the admin placed at the default path (the guide's own-domain example) --


def place_by_hand(s: settings.Settings, cert: bytes, key: bytes = KEY) -> tuple[Path, Path]:
    cert_path, key_path = certificates.certificate_paths(s)
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    return cert_path, key_path


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(
            {
                "external_url": "https://gitlab.example.com",
                "registry_external_url": "https://registry.gitlab.example.com",
            },
            id="lets-encrypt-mode",
        ),
        pytest.param(
            {
                "external_url": "https://gitlab.example.com",
                "registry_external_url": "https://registry.gitlab.example.local",
            },
            id="self-signed-mode",
        ),
    ],
)
def test_a_certificate_placed_at_the_default_path_is_served_and_never_replaced(tmp_path, config):
    s = load(tmp_path, config)
    now = dt.datetime.now(dt.UTC)
    cert = issued_by_ca([s.registry_host], not_before=now - 80 * DAY)  # within the window
    cert_path, key_path = place_by_hand(s, cert)
    s = load(tmp_path, config)  # the next run reads the host as the admin left it
    assert certificates.placed_by_admin(s) and certificates.effective_mode(s) == "files"
    tls.preflight(s)
    kinds = [type(r).__name__ for r in tls.certificate_resources(s)]
    assert "PlaceholderCertificate" not in kinds and "HostSelfSignedCertificate" not in kinds
    assert tls.late_resources(s, secrets=None) == []
    assert not any(
        isinstance(r, certificates.AcmeCertificate)
        for r in tls.renewal_resources(s, None, force=True)
    )
    changed, notifications = converge(tls.certificate_resources(s))
    assert changed[-1] == f"+ file {tls.fingerprint_path(s)} (created)"
    assert cert_path.read_bytes() == cert and key_path.read_bytes() == KEY


def test_a_broken_certificate_placed_by_hand_is_refused_naming_the_way_out(tmp_path):
    s = load(tmp_path, {"external_url": "https://gitlab.example.com"})
    cert_path, _ = place_by_hand(
        s, issued_by_ca(["other.example.com"], not_before=dt.datetime.now(dt.UTC))
    )
    s = load(tmp_path, {"external_url": "https://gitlab.example.com"})  # the next run
    with pytest.raises(ConfigError) as raised:
        tls.preflight(s)
    assert raised.value.problems == [
        f"registry_nginx.ssl_certificate: {cert_path}: The certificate does not cover "
        f"gitlab.example.com (it covers: other.example.com).",
        f"{cert_path} is a certificate placed by hand (not written by the appliance): fix "
        f"it, or remove it and its key to let the appliance manage the certificate "
        f"(letsencrypt)",
    ]


def test_certificates_the_appliance_wrote_stay_its_own(tmp_path):
    """A placeholder, a self-signed certificate or an issued one (recorded when written)."""
    s = load(tmp_path, {"external_url": "https://gitlab.example.com"})
    converge(tls.certificate_resources(s))
    assert not certificates.placed_by_admin(s)  # the placeholder: self-signed
    order = tls.acme_certificate(s, type("Secrets", (), {"letsencrypt_account_key": "x"})())
    assert order.record == certificates.written_record(s)
    issued = issued_by_ca(["gitlab.example.com"])
    cert_path, _ = place_by_hand(s, issued)
    certificates.record_written(order.record, cert_path)  # what AcmeCertificate.apply does last
    s = load(tmp_path, {"external_url": "https://gitlab.example.com"})  # the next run
    assert not certificates.placed_by_admin(s) and certificates.effective_mode(s) == "letsencrypt"
    assert [
        type(r).__name__
        for r in tls.late_resources(s, type("Secrets", (), {"letsencrypt_account_key": "x"})())
    ] == ["AcmeCertificate"]


# --- renew-certs without services ---------------------------------------------------------


def test_renew_certs_logs_every_attempt_and_renews_only_what_is_due(tmp_path):
    import io

    import recipes
    from appliance import pipeline
    from appliance import secrets as secrets_module
    from appliance.errors import ApplianceError

    def renew(s, force=False, stream=None):  # what `appliance-ctl renew-certs` runs
        pipeline.execute(s, recipes.renewal(s, force=force), stream=stream)
        return 0

    s = load(tmp_path, {"external_url": "https://localhost"})
    with pytest.raises(ApplianceError) as raised:
        renew(s, stream=io.StringIO())
    assert "run appliance-ctl reconfigure first" in str(raised.value)

    s.paths.secrets_file.write_text(secrets_module.load_or_generate(s.paths.secrets_file).to_json())
    converge(tls.certificate_resources(s))
    cert_path, _ = certificates.certificate_paths(s)
    first = cert_path.read_bytes()

    out = io.StringIO()
    assert renew(s, stream=out) == 0
    assert "renew-certs: 0 certificates renewed" in out.getvalue()
    assert cert_path.read_bytes() == first

    out = io.StringIO()
    assert renew(s, force=True, stream=out) == 0
    assert "renew-certs: 1 certificate renewed" in out.getvalue()
    assert (
        "service nginx is not running; it loads the new certificate when it starts"
        in out.getvalue()
    )
    assert cert_path.read_bytes() != first

    logs = sorted((s.paths.log_dir / "renewer").glob("*.log"))
    assert len(logs) == 3  # the refused attempt included
    assert "run appliance-ctl reconfigure first" in logs[0].read_text()
    assert "1 certificate renewed" in logs[2].read_text()


def test_the_renewer_retries_hourly_while_the_placeholder_is_served(tmp_path):
    s = load(tmp_path, {"external_url": "https://gitlab.example.com"})
    assert renewer_program.renewal_runs_per_day(s) == 24  # no certificate yet
    converge(tls.certificate_resources(s))
    assert renewer_program.renewal_runs_per_day(s) == 24  # the placeholder
    cert_path, key_path = certificates.certificate_paths(s)
    key_path.write_bytes(KEY)
    cert_path.write_bytes(issued_by_ca(["gitlab.example.com"]))
    # issued by the appliance:
    certificates.record_written(certificates.written_record(s), cert_path)
    assert renewer_program.renewal_runs_per_day(s) == 2
    self_signed = load(tmp_path / "other", {"external_url": "https://localhost"})
    assert renewer_program.renewal_runs_per_day(self_signed) == 2
