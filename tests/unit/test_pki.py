"""Certificate checks, the renewal decision and the renewal schedule, as tables."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import statistics

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from appliance import pki
from appliance.errors import ApplianceError

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)

KEY = pki.generate_private_key("ec-p256")
OTHER_KEY = pki.generate_private_key("ec-p256")


def cert_for(names: list[str], issued: dt.datetime = NOW - 10 * DAY, days: int = 90) -> bytes:
    return pki.self_signed_certificate(KEY, names, days=days, now=issued)


def ca_signed_chain(names: list[str]) -> tuple[bytes, bytes]:
    """leaf + intermediate PEM, as a commercial CA delivers them, and the leaf's key."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Intermediate")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - 100 * DAY)
        .not_valid_after(NOW + 1000 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key_pem = pki.generate_private_key("ec-p256")
    leaf_key = serialization.load_pem_private_key(leaf_key_pem, None)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(2)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 89 * DAY)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return leaf.public_bytes(pem) + ca_cert.public_bytes(pem), leaf_key_pem


# --- keys and certificates ---------------------------------------------------------


@pytest.mark.parametrize(
    "key_type, algorithm, size",
    [
        ("ec-p256", ec.EllipticCurvePrivateKey, 256),
        ("ec-p384", ec.EllipticCurvePrivateKey, 384),
        ("rsa-2048", rsa.RSAPrivateKey, 2048),
        ("rsa-3072", rsa.RSAPrivateKey, 3072),
    ],
)
def test_generated_keys_are_unencrypted_pkcs8_of_the_asked_type(key_type, algorithm, size):
    pem = pki.generate_private_key(key_type)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, algorithm)
    assert key.key_size == size


def test_unknown_key_type_names_the_choices():
    with pytest.raises(pki.UnknownKeyType) as raised:
        pki.generate_private_key("dsa-1024")
    assert isinstance(raised.value, ApplianceError)
    assert isinstance(raised.value, ValueError)
    assert "'dsa-1024'" in str(raised.value)
    assert "ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096" in str(raised.value)


def test_self_signed_certificate_is_a_host_certificate_for_all_names():
    pem = pki.self_signed_certificate(KEY, ["registry.test", "127.0.0.1", "::1"], now=NOW)
    cert = x509.load_pem_x509_certificate(pem)
    info = pki.certificate_info(pem)
    assert info.subject == "CN=registry.test"
    assert info.dns_names == ("registry.test",)
    assert info.ip_addresses == ("127.0.0.1", "::1")
    assert info.self_signed
    assert info.not_after - info.not_before == 365 * DAY
    assert info.not_before <= NOW < info.not_after
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert pki.check_certificate(pem, KEY, ["registry.test", "127.0.0.1", "::1"], NOW) == []


def test_self_signed_certificate_needs_a_name():
    with pytest.raises(pki.CertificateError):
        pki.self_signed_certificate(KEY, [])


def test_signing_certificate_publishes_the_signing_key_as_a_root():
    signing_key = pki.generate_private_key("rsa-2048")
    pem = pki.signing_certificate(signing_key, "appliance token signer", now=NOW)
    cert = x509.load_pem_x509_certificate(pem)
    info = pki.certificate_info(pem)
    assert info.subject == "CN=appliance token signer"
    assert info.self_signed
    assert info.not_after - info.not_before == 3650 * DAY
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert pki.public_key_matches(pem, signing_key)
    assert not pki.public_key_matches(pem, KEY)


def test_public_key_matches_looks_at_the_leaf_of_a_chain():
    chain, leaf_key = ca_signed_chain(["registry.test"])
    assert pki.public_key_matches(chain, leaf_key)
    assert not pki.public_key_matches(chain, KEY)
    info = pki.certificate_info(chain)
    assert info.issuer == "CN=Test Intermediate"
    assert not info.self_signed


def test_fingerprint_is_the_sha256_openssl_shows():
    pem = cert_for(["registry.test"])
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    expected = hashlib.sha256(der).hexdigest().upper()
    assert pki.certificate_info(pem).fingerprint_sha256.replace(":", "") == expected


# --- check_certificate ----------------------------------------------------------------

GOOD = cert_for(["registry.test"])
EXPIRED = cert_for(["registry.test"], issued=NOW - 100 * DAY)
NOT_YET_VALID = cert_for(["registry.test"], issued=NOW + 2 * DAY)
WILDCARD = cert_for(["*.example.com"])


@pytest.mark.parametrize(
    "cert, key, hosts, expected",
    [
        pytest.param(GOOD, KEY, ["registry.test"], [], id="good"),
        pytest.param(GOOD, KEY, ["REGISTRY.test."], [], id="case-and-trailing-dot"),
        pytest.param(
            EXPIRED,
            KEY,
            ["registry.test"],
            ["The certificate for CN=registry.test expired on 2026-05-22 11:55 UTC."],
            id="expired",
        ),
        pytest.param(
            NOT_YET_VALID,
            KEY,
            ["registry.test"],
            [
                "The certificate for CN=registry.test is not valid before 2026-06-03 11:55 UTC;"
                " check the clock of this host."
            ],
            id="not-yet-valid",
        ),
        pytest.param(
            GOOD,
            KEY,
            ["registry.test", "other.test"],
            ["The certificate does not cover other.test (it covers: registry.test)."],
            id="wrong-host",
        ),
        pytest.param(
            GOOD,
            OTHER_KEY,
            ["registry.test"],
            ["The private key does not match the certificate for CN=registry.test."],
            id="key-mismatch",
        ),
        pytest.param(WILDCARD, KEY, ["registry.example.com"], [], id="wildcard"),
        pytest.param(
            WILDCARD,
            KEY,
            ["example.com", "a.b.example.com"],
            [
                "The certificate does not cover example.com (it covers: *.example.com).",
                "The certificate does not cover a.b.example.com (it covers: *.example.com).",
            ],
            id="wildcard-neither-apex-nor-two-levels",
        ),
        pytest.param(
            EXPIRED,
            OTHER_KEY,
            ["elsewhere.test"],
            [
                "The private key does not match the certificate for CN=registry.test.",
                "The certificate for CN=registry.test expired on 2026-05-22 11:55 UTC.",
                "The certificate does not cover elsewhere.test (it covers: registry.test).",
            ],
            id="all-problems-at-once",
        ),
        pytest.param(
            b"not a certificate",
            KEY,
            ["registry.test"],
            ["The certificate file holds no readable PEM certificate."],
            id="unparseable-certificate",
        ),
        pytest.param(
            GOOD,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            ["registry.test"],
            ["The key file holds no readable unencrypted PEM private key."],
            id="unparseable-key",
        ),
    ],
)
def test_check_certificate(cert, key, hosts, expected):
    assert pki.check_certificate(cert, key, hosts, NOW) == expected


def test_check_certificate_accepts_a_chain_with_the_leaf_first():
    chain, leaf_key = ca_signed_chain(["registry.example.com", "example.com"])
    assert pki.check_certificate(chain, leaf_key, ["registry.example.com"], NOW) == []


def test_check_certificate_explains_a_chain_in_the_wrong_order():
    chain, leaf_key = ca_signed_chain(["registry.example.com"])
    leaf, intermediate = x509.load_pem_x509_certificates(chain)
    pem = serialization.Encoding.PEM
    reversed_chain = intermediate.public_bytes(pem) + leaf.public_bytes(pem)
    [problem, not_covered] = pki.check_certificate(
        reversed_chain, leaf_key, ["registry.example.com"], NOW
    )
    assert "It matches certificate #2 in the file: put the server certificate first" in problem
    assert "does not cover registry.example.com" in not_covered


def test_check_certificate_rejects_naive_times():
    with pytest.raises(ValueError):
        pki.check_certificate(GOOD, KEY, ["registry.test"], dt.datetime(2026, 6, 1))


@pytest.mark.parametrize(
    "san, host, covered",
    [
        ("registry.example.com", "registry.example.com", True),
        ("registry.example.com", "Registry.Example.COM", True),
        ("registry.example.com", "example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "A.EXAMPLE.COM", True),
        ("*.Example.com.", "a.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "a.example.org", False),
        ("*.example.com", "aexample.com", False),
        ("*.com", "example.com", False),
        ("a.*.example.com", "a.b.example.com", False),
        ("f*.example.com", "foo.example.com", False),
        ("*.example.com", "127.0.0.1", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("::1", "::1", True),
        ("::1", "[::1]", True),
        ("::1", "0:0:0:0:0:0:0:1", True),
        ("127.0.0.1", "127.0.0.2", False),
    ],
)
def test_name_matching_follows_rfc_6125(san, host, covered):
    try:
        ipaddress.ip_address(san)
        info = pki.CertificateInfo("", "", NOW, NOW, (), (san,), "", True)
    except ValueError:
        info = pki.CertificateInfo("", "", NOW, NOW, (san,), (), "", True)
    assert pki.covers(info, host) is covered


# --- should_renew ---------------------------------------------------------------------

WINDOW = 30 * DAY


@pytest.mark.parametrize(
    "cert, hosts, expected",
    [
        pytest.param(None, None, (True, "no certificate yet"), id="missing"),
        pytest.param(
            b"garbage",
            None,
            (
                True,
                "the current certificate cannot be read "
                "(The certificate file holds no readable PEM certificate.)",
            ),
            id="unparseable",
        ),
        pytest.param(
            cert_for(["registry.test"], issued=NOW - 30 * DAY, days=90),
            ["registry.test"],
            (False, "not due: expires in 59 days (2026-07-31 11:55 UTC)"),
            id="not-due",
        ),
        pytest.param(
            cert_for(["registry.test"], issued=NOW - 59 * DAY, days=90),
            None,
            (False, "not due: expires in 30 days (2026-07-02 11:55 UTC)"),
            id="a-day-before-the-window",
        ),
        pytest.param(
            cert_for(["registry.test"], issued=NOW - 60 * DAY, days=90),
            None,
            (True, "within the renewal window: expires in 29 days"),
            id="window-starts",
        ),
        pytest.param(
            cert_for(["registry.test"], issued=NOW - 80 * DAY, days=90),
            None,
            (True, "within the renewal window: expires in 9 days"),
            id="within-window",
        ),
        pytest.param(
            cert_for(["registry.test"], issued=NOW - 91 * DAY, days=90),
            None,
            (True, "expired on 2026-05-31 11:55 UTC"),
            id="expired",
        ),
        pytest.param(
            cert_for(["registry.test"], issued=NOW - 30 * DAY, days=90),
            ["registry.test", "registry2.test"],
            (True, "names changed: registry2.test not covered (certificate covers: registry.test)"),
            id="names-changed",
        ),
        pytest.param(
            cert_for(["registry.test", "old.test"], issued=NOW - 30 * DAY, days=90),
            ["registry.test"],
            (False, "not due: expires in 59 days (2026-07-31 11:55 UTC)"),
            id="extra-names-are-harmless",
        ),
    ],
)
def test_should_renew(cert, hosts, expected):
    assert pki.should_renew(cert, NOW, WINDOW, hosts) == expected


def test_a_self_signed_placeholder_is_due_only_where_a_ca_certificate_belongs():
    placeholder = cert_for(["registry.test"], issued=NOW, days=365)
    assert pki.should_renew(
        placeholder, NOW, WINDOW, ["registry.test"], replace_self_signed=True
    ) == (True, "the current certificate is a self-signed placeholder")
    assert pki.should_renew(placeholder, NOW, WINDOW, ["registry.test"])[0] is False
    chain, _ = ca_signed_chain(["registry.test"])
    assert pki.should_renew(chain, NOW, WINDOW, ["registry.test"], replace_self_signed=True) == (
        False,
        "not due: expires in 89 days (2026-08-29 12:00 UTC)",
    )


def test_should_renew_exactly_at_the_window_edge():
    cert = cert_for(["registry.test"], issued=NOW, days=90)
    not_after = pki.certificate_info(cert).not_after
    assert pki.should_renew(cert, not_after - WINDOW, WINDOW)[0] is True
    assert pki.should_renew(cert, not_after - WINDOW - dt.timedelta(seconds=1), WINDOW)[0] is False


# --- next_renewal_run -----------------------------------------------------------------


def test_renewal_schedule_is_stable_per_host():
    runs = [pki.next_renewal_run(NOW, "registry.example.com") for _ in range(3)]
    assert len(set(runs)) == 1
    # The same slot of the day, every day, whatever time the renewer (re)starts.
    offsets = set()
    for hour in range(0, 48, 5):
        run = pki.next_renewal_run(NOW + dt.timedelta(hours=hour), "registry.example.com")
        offsets.add((run - run.replace(hour=0, minute=0, second=0)) % dt.timedelta(hours=12))
    assert len(offsets) == 1
    assert pki.next_renewal_run(NOW, "REGISTRY.example.com") == runs[0]


@pytest.mark.parametrize("runs_per_day", [1, 2, 4])
def test_renewal_runs_come_every_period(runs_per_day):
    period = DAY / runs_per_day
    moment = NOW
    for _ in range(10):
        run = pki.next_renewal_run(moment, "registry.example.com", runs_per_day)
        assert moment < run <= moment + period
        following = pki.next_renewal_run(run, "registry.example.com", runs_per_day)
        assert following - run == period
        moment = run
    assert run.tzinfo is not None


def test_renewal_schedule_spreads_hosts_over_the_period():
    period = dt.timedelta(hours=12)
    midnight = NOW.replace(hour=0)
    offsets = [
        ((pki.next_renewal_run(midnight, f"host{n}.example.com") - midnight) % period) / period
        for n in range(400)
    ]
    assert len(set(offsets)) > 390
    quarters = [sum(1 for o in offsets if q / 4 <= o < (q + 1) / 4) for q in range(4)]
    assert all(60 < count < 140 for count in quarters), quarters
    assert 0.4 < statistics.mean(offsets) < 0.6


def test_renewal_schedule_rejects_naive_times_and_zero_runs():
    with pytest.raises(ValueError):
        pki.next_renewal_run(dt.datetime(2026, 6, 1), "registry.example.com")
    with pytest.raises(ValueError):
        pki.next_renewal_run(NOW, "registry.example.com", runs_per_day=0)
