"""The admin's own certificate files, with the whole appliance (real nginx, skopeo).

A test CA issues a wildcard certificate for `*.example.test`; the registry runs on
`registry.example.test` (its own domain, as in the guide's wildcard example). skopeo
trusts only the test CA and reaches the name through a private /etc/hosts (see
`NamedSkopeo`).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import pki
from tests.support.appliance import ApplianceUnderTest, free_port
from tests.support.oci import build_image
from tests.support.pebble import NamedSkopeo

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


class CompanyCA:
    """A root that signs server certificates, as a company CA or a commercial one does."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Appliance Test CA")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, names: list[str], not_before: dt.datetime = NOW - DAY, days: int = 90
    ) -> tuple[bytes, bytes]:
        """(certificate + CA chain, key) PEM."""
        key_pem = pki.generate_private_key("ec-p256")
        key = serialization.load_pem_private_key(key_pem, None)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + days * DAY)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return leaf.public_bytes(serialization.Encoding.PEM) + self.pem, key_pem


@pytest.fixture(scope="module")
def ca() -> CompanyCA:
    return CompanyCA()


@pytest.fixture(scope="module")
def appliance(ca, tmp_path_factory):
    admin_dir = tmp_path_factory.mktemp("admin-certs")
    cert, key = ca.issue(["*.example.test"])
    (admin_dir / "wildcard.pem").write_bytes(cert)
    (admin_dir / "wildcard.key").write_bytes(key)
    appliance = ApplianceUnderTest.create(
        {
            "external_url": "https://gitlab.example.test",
            "registry_external_url": f"https://registry.example.test:{free_port()}",
            "registry_nginx": {
                "ssl_certificate": str(admin_dir / "wildcard.pem"),
                "ssl_certificate_key": str(admin_dir / "wildcard.key"),
            },
        },
        prefix="appliance-files-",
    )
    appliance.admin_dir = admin_dir
    try:
        appliance.first_run = appliance.reconfigure()
        appliance.wait_until_running()
        yield appliance
    finally:
        appliance.destroy()


def served(appliance: ApplianceUnderTest) -> bytes:
    port = int(appliance.registry_address.rsplit(":", 1)[1])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=appliance.host) as tls:
            return tls.getpeercert(binary_form=True)


def leaf_der(chain_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificates(chain_pem)[0].public_bytes(serialization.Encoding.DER)


def install(appliance: ApplianceUnderTest, cert: bytes, key: bytes) -> None:
    """What an admin does when the CA renewed the certificate: overwrite both files."""
    (appliance.admin_dir / "wildcard.pem").write_bytes(cert)
    (appliance.admin_dir / "wildcard.key").write_bytes(key)


def client(appliance: ApplianceUnderTest, ca: CompanyCA, home: Path) -> NamedSkopeo:
    (home / "certs").mkdir(parents=True)
    (home / "certs/ca.crt").write_bytes(ca.pem)
    (home / "hosts").write_text(f"127.0.0.1 localhost {appliance.host}\n")
    return NamedSkopeo(
        home=home,
        registry=appliance.registry_address,
        username="root",
        password=appliance.password,
        cert_dir=home / "certs",
        hosts_file=home / "hosts",
    )


def test_the_wildcard_certificate_is_served_and_verified(appliance, ca, tmp_path):
    assert served(appliance) == leaf_der((appliance.admin_dir / "wildcard.pem").read_bytes())
    assert "renewer" not in appliance.pids()  # nothing to renew: the files are the admin's
    assert not (appliance.root / "etc/appliance/ssl/registry.example.test.crt").exists()
    skopeo = client(appliance, ca, tmp_path / "client")
    image = build_image(tmp_path / "image", tag="v1")
    skopeo.push(image, "root/files", "v1")
    assert skopeo.digest("root/files", "v1") == image.manifest_digest


def test_a_replaced_certificate_reloads_nginx_on_the_next_reconfigure(appliance, ca):
    nginx = appliance.pids()["nginx"]
    cert, key = ca.issue(["*.example.test"])
    install(appliance, cert, key)
    result = appliance.reconfigure()
    assert "+ service nginx (reloaded)" in result.stdout
    assert served(appliance) == leaf_der(cert)
    assert appliance.pids()["nginx"] == nginx
    assert (appliance.admin_dir / "wildcard.pem").read_bytes() == cert  # never rewritten
    again = appliance.reconfigure()
    assert "reloaded" not in again.stdout and "reconfigure: 0/" in again.stdout


@pytest.mark.parametrize(
    "names, not_before, other_key, problems",
    [
        (["*.example.test"], NOW - 100 * DAY, False, ["expired on"]),
        (
            ["registry.other.test"],
            NOW - DAY,
            True,
            [
                "The private key does not match the certificate for CN=registry.other.test.",
                "The certificate does not cover registry.example.test (it covers: "
                "registry.other.test).",
            ],
        ),
    ],
)
def test_unusable_files_are_refused_and_the_old_certificate_stays(
    appliance, ca, names, not_before, other_key, problems
):
    good_cert = (appliance.admin_dir / "wildcard.pem").read_bytes()
    good_key = (appliance.admin_dir / "wildcard.key").read_bytes()
    before, nginx = served(appliance), appliance.pids()["nginx"]
    cert, key = ca.issue(names, not_before=not_before)
    install(appliance, cert, pki.generate_private_key() if other_key else key)
    try:
        result = appliance.reconfigure(check=False)
    finally:
        install(appliance, good_cert, good_key)
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"appliance-ctl: the certificate files cannot be used: {len(problems)} problem"
    )
    listed = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(listed) == len(problems)
    for line, problem in zip(listed, problems, strict=True):
        assert line.startswith(
            f"  - registry_nginx.ssl_certificate: {appliance.admin_dir / 'wildcard.pem'}: "
        )
        assert problem in line
    assert result.stdout == ""  # nothing was converged
    assert served(appliance) == before and appliance.pids()["nginx"] == nginx
