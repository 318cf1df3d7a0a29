"""ACME issuance against a real pebble + pebble-challtestsrv on loopback.

The http-01 webroot is served by a small Python HTTP server here; serving it through
nginx is tested with the whole appliance.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from acme import client as acme_client
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.verification import PolicyBuilder, Store

from appliance import letsencrypt, pki
from tests.support.pebble import PebbleServer, WebrootServer, free_port

CONTACT = ["admin@registry.test"]


@pytest.fixture(scope="module")
def acme(tmp_path_factory):
    """One pebble for the module, validating against a webroot served on loopback."""
    webroot = tmp_path_factory.mktemp("webroot")
    http01_port = free_port()
    with (
        PebbleServer(tmp_path_factory.mktemp("pebble"), http01_port=http01_port) as pebble,
        WebrootServer(webroot, http01_port),
    ):
        yield SimpleNamespace(pebble=pebble, webroot=webroot)


@pytest.fixture(scope="module")
def account_key():
    return letsencrypt.generate_account_key()


def obtain(pebble: PebbleServer, webroot: Path, domains: list[str], **overrides):
    arguments = dict(
        directory_url=pebble.directory_url,
        account_key_pem=overrides.pop("account_key_pem", None),
        webroot=webroot,
        contact_emails=CONTACT,
        ca_bundle=pebble.ca_bundle_path,
        key_type="ec-p256",
    )
    arguments.update(overrides)
    if arguments["account_key_pem"] is None:
        arguments["account_key_pem"] = letsencrypt.generate_account_key()
    return letsencrypt.obtain_certificate(domains, **arguments)


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def verify_chain(fullchain_pem: bytes, root_pem: bytes, host: str) -> None:
    """What a TLS client does: chain to the root, valid now, issued for `host`."""
    leaf, *intermediates = x509.load_pem_x509_certificates(fullchain_pem)
    store = Store(x509.load_pem_x509_certificates(root_pem))
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(host))
    verifier.verify(leaf, intermediates)


def tls_handshake(
    fullchain_pem: bytes, key_pem: bytes, root_pem: bytes, host: str, tmp_path: Path
) -> str:
    """Serve the certificate with OpenSSL and connect as a client trusting only the root."""
    (tmp_path / "chain.pem").write_bytes(fullchain_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    client_context = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)

        server = threading.Thread(target=serve)
        server.start()
        with socket.create_connection(listener.getsockname()) as raw:
            with client_context.wrap_socket(raw, server_hostname=host) as tls:
                subject = dict(item[0] for item in tls.getpeercert()["subject"])
                tls.sendall(b"x")
        server.join()
    return subject["commonName"]


def test_first_issuance_for_one_name(acme, account_key, tmp_path):
    started = time.monotonic()
    issued = obtain(acme.pebble, acme.webroot, ["registry.test"], account_key_pem=account_key)
    elapsed = time.monotonic() - started

    root = acme.pebble.root_cert_pem()
    verify_chain(issued.fullchain_pem, root, "registry.test")
    assert (
        tls_handshake(issued.fullchain_pem, issued.key_pem, root, "registry.test", tmp_path)
        == "registry.test"
    )
    assert (
        pki.check_certificate(
            issued.fullchain_pem, issued.key_pem, ["registry.test"], dt.datetime.now(dt.UTC)
        )
        == []
    )
    info = pki.certificate_info(issued.fullchain_pem)
    assert info.dns_names == ("registry.test",)
    assert "Pebble Intermediate" in info.issuer
    assert len(x509.load_pem_x509_certificates(issued.fullchain_pem)) == 2
    assert pki.certificate_info(issued.fullchain_pem).self_signed is False
    assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert files_under(acme.webroot) == []
    assert elapsed < 10, f"issuance took {elapsed:.1f} s"


def test_first_issuance_for_two_names_puts_both_on_one_certificate(acme, account_key):
    names = ["registry.test", "registry.other.test"]
    issued = obtain(
        acme.pebble,
        acme.webroot,
        names + ["Registry.test."],
        account_key_pem=account_key,
        key_type="rsa-2048",
    )

    root = acme.pebble.root_cert_pem()
    for name in names:
        verify_chain(issued.fullchain_pem, root, name)
    info = pki.certificate_info(issued.fullchain_pem)
    assert sorted(info.dns_names) == sorted(names)
    assert info.subject == "CN=registry.test"
    assert pki.public_key_matches(issued.fullchain_pem, issued.key_pem)
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert files_under(acme.webroot) == []


def test_a_certificate_from_another_pebble_run_does_not_verify(acme, account_key, tmp_path):
    """Guards the two checks above: they do fail against a different root."""
    issued = obtain(acme.pebble, acme.webroot, ["registry.test"], account_key_pem=account_key)
    with PebbleServer(tmp_path / "other") as other:
        foreign_root = other.root_cert_pem()
    with pytest.raises(x509.verification.VerificationError):
        verify_chain(issued.fullchain_pem, foreign_root, "registry.test")
    with pytest.raises(x509.verification.VerificationError):
        verify_chain(issued.fullchain_pem, acme.pebble.root_cert_pem(), "other.test")


def test_the_account_is_registered_once_and_reused(acme):
    account_key = letsencrypt.generate_account_key()
    first = obtain(acme.pebble, acme.webroot, ["registry.test"], account_key_pem=account_key)
    second = obtain(
        acme.pebble,
        acme.webroot,
        ["registry.test"],
        account_key_pem=account_key,
        contact_emails=["ops@registry.test"],
    )

    assert first.account_created is True
    assert second.account_created is False
    assert second.account_url == first.account_url
    assert second.fullchain_pem != first.fullchain_pem
    assert second.key_pem != first.key_pem
    # The changed contact address reached the CA's account record.
    assert account_contacts(acme.pebble, account_key) == ("mailto:ops@registry.test",)


def account_contacts(pebble: PebbleServer, account_key_pem: bytes) -> tuple[str, ...]:
    jwk, algorithm = letsencrypt.account_jwk(account_key_pem)
    network = acme_client.ClientNetwork(jwk, alg=algorithm, verify_ssl=pebble.ca_bundle_path)
    client = acme_client.ClientV2(
        acme_client.ClientV2.get_directory(pebble.directory_url, network), network
    )
    account = client.query_registration(messages.RegistrationResource(body=messages.Registration()))
    return tuple(account.body.contact)


def test_an_ec_account_key_works_too(acme):
    issued = obtain(
        acme.pebble,
        acme.webroot,
        ["registry.test"],
        account_key_pem=pki.generate_private_key("ec-p256"),
    )
    assert issued.account_created is True
    verify_chain(issued.fullchain_pem, acme.pebble.root_cert_pem(), "registry.test")


def test_tokens_are_served_while_pending_and_only_ours_are_removed(acme, account_key):
    """The webroot is shared with whatever else is there (nginx's own files)."""
    challenge_dir = acme.webroot / ".well-known" / "acme-challenge"
    challenge_dir.mkdir(parents=True)
    (challenge_dir / "someone-elses-token").write_text("keep me")
    (acme.webroot / "index.html").write_text("hello")
    try:
        obtain(acme.pebble, acme.webroot, ["registry.test"], account_key_pem=account_key)
        assert files_under(acme.webroot) == [
            ".well-known",
            ".well-known/acme-challenge",
            ".well-known/acme-challenge/someone-elses-token",
            "index.html",
        ]
    finally:
        (challenge_dir / "someone-elses-token").unlink()
        challenge_dir.rmdir()
        challenge_dir.parent.rmdir()
        (acme.webroot / "index.html").unlink()


# --- failures ---------------------------------------------------------------------------


def test_unreachable_challenge_fails_fast_naming_the_host(tmp_path):
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    closed_port = free_port()  # nobody listens: pebble's VA gets "connection refused"
    with PebbleServer(tmp_path / "pebble", http01_port=closed_port) as pebble:
        started = time.monotonic()
        with pytest.raises(letsencrypt.ChallengeFailed) as raised:
            obtain(pebble, webroot, ["registry.test", "registry.other.test"], deadline_seconds=20)
        elapsed = time.monotonic() - started

    message = str(raised.value)
    assert message.startswith("The CA could not validate registry.")
    assert "connection refused" in message
    assert "resolves (DNS A/AAAA records) to this host" in message
    assert "port 80 is reachable from the internet" in message
    assert files_under(webroot) == []
    assert elapsed < 5, f"failure took {elapsed:.1f} s"


def test_the_deadline_bounds_an_order_the_ca_cannot_finish(tmp_path):
    """A firewall that drops packets: the CA's fetch hangs, our deadline ends the wait."""
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    with socket.create_server(("127.0.0.1", 0), backlog=16) as black_hole:  # never accepts
        port = black_hole.getsockname()[1]
        with PebbleServer(tmp_path / "pebble", http01_port=port) as pebble:
            started = time.monotonic()
            with pytest.raises(letsencrypt.DeadlineExceeded) as raised:
                obtain(pebble, webroot, ["registry.test"], deadline_seconds=3)
            elapsed = time.monotonic() - started

    assert "No certificate for registry.test within 3 s" in str(raised.value)
    assert 2.5 < elapsed < 5, f"gave up after {elapsed:.1f} s"
    assert files_under(webroot) == []


def test_wrong_dns_names_the_host_and_the_address(acme):
    acme.pebble.set_a_record("elsewhere.test", "127.0.0.2")
    with pytest.raises(letsencrypt.ChallengeFailed) as raised:
        obtain(acme.pebble, acme.webroot, ["elsewhere.test"])
    assert "could not validate elsewhere.test" in str(raised.value)
    assert "127.0.0.2" in str(raised.value)
    assert files_under(acme.webroot) == []


def test_unreachable_directory(acme, tmp_path):
    url = f"https://127.0.0.1:{free_port()}/dir"
    with pytest.raises(letsencrypt.DirectoryUnreachable) as raised:
        obtain(acme.pebble, tmp_path, ["registry.test"], directory_url=url)
    assert str(raised.value) == (
        f"Cannot reach the ACME directory {url} (needed for registry.test): Connection "
        "refused. Check the directory URL and that this host can make outbound HTTPS "
        "connections (proxy, firewall)."
    )
    assert files_under(tmp_path) == []


def test_untrusted_directory_certificate_names_the_ca_bundle(acme, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(pki.self_signed_certificate(pki.generate_private_key(), ["127.0.0.1"]))
    with pytest.raises(letsencrypt.DirectoryUnreachable) as raised:
        obtain(acme.pebble, tmp_path / "webroot", ["registry.test"], ca_bundle=str(other_ca))
    assert str(raised.value).startswith(
        f"Cannot verify the TLS certificate of the ACME server {acme.pebble.directory_url} "
        f"against the CA bundle {other_ca} (needed for registry.test): "
    )
    assert not (tmp_path / "webroot").exists()


def test_invalid_contact_is_an_account_error(acme):
    with pytest.raises(letsencrypt.AccountRejected) as raised:
        obtain(acme.pebble, acme.webroot, ["registry.test"], contact_emails=["not an email"])
    assert "Check letsencrypt.contact_emails" in str(raised.value)
    assert '"not an email"' in str(raised.value)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("127.0.0.1", "does not issue certificates for the IP address 127.0.0.1"),
        ("*.registry.test", "A wildcard name (*.registry.test) cannot be validated over http-01"),
    ],
)
def test_names_http01_cannot_prove_are_refused_before_ordering(name, expected, tmp_path):
    with pytest.raises(letsencrypt.IdentifierRejected) as raised:
        letsencrypt.obtain_certificate(
            ["registry.test", name],
            directory_url=f"https://127.0.0.1:{free_port()}/dir",  # never contacted
            account_key_pem=b"unused",
            webroot=tmp_path,
            contact_emails=CONTACT,
            ca_bundle=None,
            key_type="ec-p256",
        )
    assert expected in str(raised.value)


def test_names_the_ca_refuses_are_reported_with_its_reason(acme):
    with pytest.raises(letsencrypt.IssuanceError) as raised:
        obtain(acme.pebble, acme.webroot, ["bad_name.test"])
    assert str(raised.value).startswith("The ACME server refused the order for bad_name.test: ")
    assert "illegal character" in str(raised.value)


def test_a_bad_key_type_fails_before_contacting_the_ca(tmp_path):
    with pytest.raises(pki.UnknownKeyType):
        letsencrypt.obtain_certificate(
            ["registry.test"],
            directory_url=f"https://127.0.0.1:{free_port()}/dir",  # would be unreachable
            account_key_pem=letsencrypt.generate_account_key(),
            webroot=tmp_path,
            contact_emails=CONTACT,
            ca_bundle=None,
            key_type="rsa-1024",
        )


def test_short_lived_certificates_are_due_for_renewal_at_once(tmp_path):
    """pebble's certificateValidityPeriod, for renewal tests of the whole appliance."""
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    port = free_port()
    with (
        PebbleServer(tmp_path / "pebble", http01_port=port, cert_validity_seconds=3600) as pebble,
        WebrootServer(webroot, port),
    ):
        issued = obtain(pebble, webroot, ["registry.test"])
    info = pki.certificate_info(issued.fullchain_pem)
    assert dt.timedelta(minutes=59) <= info.not_after - info.not_before <= dt.timedelta(hours=1)
    now = dt.datetime.now(dt.UTC)
    assert pki.should_renew(
        issued.fullchain_pem,
        now,
        dt.timedelta(days=30),
        ["registry.test"],
        replace_self_signed=True,
    ) == (True, "within the renewal window: expires in 0 days")
    assert pki.should_renew(issued.fullchain_pem, now, dt.timedelta(minutes=5))[0] is False
