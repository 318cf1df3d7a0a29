"""Let's Encrypt for the whole appliance, against a real pebble + pebble-challtestsrv.

Each appliance runs under a temporary root with its own pebble, whose http-01 port is
the appliance's `nginx.http_port`: pebble's DNS (challtestsrv) resolves every name to
127.0.0.1, so the CA fetches the challenge from the appliance's real nginx.

skopeo must reach `appliance.test` on 127.0.0.1 too. Pebble refuses IP addresses and
the names stay `.test` names (reserved, never public); instead of an /etc/hosts entry
for the whole machine, skopeo runs in a private mount namespace (`unshare -m`) where a
test-owned hosts file is bind-mounted over /etc/hosts: only that one process sees the
names, and it verifies the served chain against pebble's root as any client would.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from appliance import pki
from tests.support.appliance import ApplianceUnderTest, free_port
from tests.support.oci import build_image
from tests.support.pebble import NamedSkopeo, PebbleServer
from tests.support.skopeo import SkopeoError

CONTACT = ["admin@appliance.test"]


def client(appliance: ApplianceUnderTest, pebble: PebbleServer, home: Path) -> NamedSkopeo:
    """A registry client that trusts pebble's root, and nothing else, for this registry."""
    cert_dir = home / "certs"
    cert_dir.mkdir(parents=True, exist_ok=True)
    (cert_dir / "ca.crt").write_bytes(pebble.root_cert_pem())
    hosts = home / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {appliance.host}\n")
    return NamedSkopeo(
        home=home,
        registry=appliance.registry_address,
        username="root",
        password=appliance.password,
        cert_dir=cert_dir,
        hosts_file=hosts,
    )


def served_certificate(appliance: ApplianceUnderTest) -> x509.Certificate:
    """The leaf nginx presents to a client asking for the registry host (SNI)."""
    port = int(appliance.registry_address.rsplit(":", 1)[1])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=appliance.host) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def verified_handshake(appliance: ApplianceUnderTest, root_pem: bytes) -> str:
    """A TLS client trusting only pebble's root, checking the host name: the subject CN."""
    port = int(appliance.registry_address.rsplit(":", 1)[1])
    context = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=appliance.host) as tls:
            return dict(item[0] for item in tls.getpeercert()["subject"])["commonName"]


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def leaf_on_disk(appliance: ApplianceUnderTest) -> x509.Certificate:
    return x509.load_pem_x509_certificates(appliance.certificate.read_bytes())[0]


def lets_encrypt(pebble: PebbleServer) -> dict:
    return {
        "enable": True,
        "directory_url": pebble.directory_url,
        "ca_bundle": pebble.ca_bundle_path,
        "contact_emails": CONTACT,
    }


def summary_line(output: str, prefix: str = "reconfigure: ") -> str:
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert lines, output
    return lines[-1]


# --- registry on port 5050 of the main host ---------------------------------------------


@pytest.fixture(scope="module")
def main_host(tmp_path_factory):
    """external_url https://appliance.test; the registry on another port of that host
    (a free port standing in for 5050)."""
    http_port = free_port()
    with PebbleServer(tmp_path_factory.mktemp("pebble"), http01_port=http_port) as pebble:
        appliance = ApplianceUnderTest.create(
            {
                "external_url": "https://appliance.test",
                "registry_external_url": f"https://appliance.test:{free_port()}",
                "nginx": {"http_port": http_port},
                "letsencrypt": lets_encrypt(pebble),
            },
            prefix="appliance-le-",
        )
        try:
            started = time.monotonic()
            appliance.first_run = appliance.reconfigure()
            appliance.first_run_seconds = time.monotonic() - started
            appliance.wait_until_running()
            appliance.pebble = pebble
            yield appliance
        finally:
            appliance.destroy()


def test_first_reconfigure_issues_a_certificate_for_the_main_host(main_host):
    out = main_host.first_run.stdout
    assert (
        f"+ certificate {main_host.certificate} (updated: order from "
        f"{main_host.pebble.directory_url}: "
    ) in out
    assert "+ service nginx (reloaded)" in out
    leaf = leaf_on_disk(main_host)
    info = pki.certificate_info(main_host.certificate.read_bytes())
    assert info.dns_names == ("appliance.test",)
    assert "Pebble Intermediate" in info.issuer and not info.self_signed
    assert fingerprint(served_certificate(main_host)) == fingerprint(leaf)
    assert verified_handshake(main_host, main_host.pebble.root_cert_pem()) == "appliance.test"
    key = main_host.certificate.with_suffix(".key")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    challenges = main_host.root / "var/opt/appliance/nginx/acme-webroot/.well-known/acme-challenge"
    assert list(challenges.iterdir()) == []  # only in-flight tokens, and none is
    print(f"first reconfigure with issuance: {main_host.first_run_seconds:.1f} s")


def test_push_and_pull_verifying_the_issued_certificate(main_host, tmp_path):
    skopeo = client(main_host, main_host.pebble, tmp_path / "client")
    image = build_image(tmp_path / "image", tag="v1")
    skopeo.push(image, "root/tls", "v1")
    assert skopeo.digest("root/tls", "v1") == image.manifest_digest


def test_a_client_without_pebbles_root_refuses_the_registry(main_host, tmp_path):
    """Guards the test above: verification is on, and a foreign root does fail."""
    skopeo = client(main_host, main_host.pebble, tmp_path / "client")
    (skopeo.cert_dir / "ca.crt").write_bytes(
        pki.self_signed_certificate(pki.generate_private_key(), ["appliance.test"])
    )
    with pytest.raises(SkopeoError) as refused:
        skopeo.list_tags("root/tls")
    assert "certificate signed by unknown authority" in refused.value.stderr


def test_second_reconfigure_does_not_contact_the_acme_server(main_host):
    """The directory URL now points at a closed port: any ACME request would fail."""
    before = main_host.certificate.read_bytes()
    pids = main_host.pids()
    main_host.write_config(
        {"letsencrypt": {"directory_url": f"https://127.0.0.1:{free_port()}/dir"}}
    )
    try:
        result = main_host.reconfigure()
        renewal = main_host.ctl("renew-certs")
    finally:
        main_host.write_config({"letsencrypt": lets_encrypt(main_host.pebble)})
    assert summary_line(result.stdout).startswith("reconfigure: 0/"), result.stdout
    assert f"  certificate {main_host.certificate} (up to date)" in result.stdout
    assert summary_line(renewal.stdout, "renew-certs: ").startswith(
        "renew-certs: 0 certificates renewed"
    ), renewal.stdout
    assert main_host.certificate.read_bytes() == before
    assert main_host.pids() == pids


def test_failed_renewal_keeps_the_certificate_serving_and_says_why(main_host, tmp_path):
    """pebble's http-01 port points at a closed port: the CA cannot reach the challenge."""
    before_file = main_host.certificate.read_bytes()
    before_served = fingerprint(served_certificate(main_host))
    nginx_pid = main_host.pids()["nginx"]
    with PebbleServer(tmp_path / "pebble", http01_port=free_port()) as unreachable:
        main_host.write_config({"letsencrypt": lets_encrypt(unreachable)})
        try:
            result = main_host.ctl("renew-certs", "--force", check=False)
        finally:
            main_host.write_config({"letsencrypt": lets_encrypt(main_host.pebble)})
    assert result.returncode == 1, result
    message = result.stderr
    assert message.startswith("appliance-ctl: certificate "), message
    assert "The CA could not validate appliance.test" in message
    assert "port 80 is reachable from the internet" in message
    assert f"The certificate in place ({main_host.certificate}) was kept" in message
    assert "Traceback" not in message
    assert main_host.certificate.read_bytes() == before_file
    assert fingerprint(served_certificate(main_host)) == before_served
    assert main_host.pids()["nginx"] == nginx_pid
    logs = sorted((main_host.root / "var/log/appliance/renewer").glob("*.log"))
    assert "The CA could not validate appliance.test" in logs[-1].read_text()


def test_forced_renewal_during_a_large_push(main_host, tmp_path):
    """The push started before the renewal completes; new connections get the new
    certificate; nginx was reloaded (same master pid), not restarted."""
    skopeo = client(main_host, main_host.pebble, tmp_path / "client")
    image = build_image(tmp_path / "image", tag="big", random_bytes=1200 * 1024 * 1024)
    before = served_certificate(main_host)
    nginx_pid = main_host.pids()["nginx"]
    outcome: dict[str, object] = {}

    def push() -> None:
        started = time.monotonic()
        try:
            skopeo.push(image, "root/big", "big")
        except SkopeoError as error:
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    pusher = threading.Thread(target=push)
    pusher.start()
    uploads = main_host.root / "var/opt/appliance/registry/data/docker/registry/v2/repositories"
    wait_for(
        lambda: any(
            p.is_file() and p.stat().st_size > 5 * 1024 * 1024
            for p in uploads.rglob("_uploads/*/data")
        ),
        timeout=60,
    )
    started = time.monotonic()
    renewal = main_host.ctl("renew-certs", "--force")
    renewal_seconds = time.monotonic() - started
    push_was_running = pusher.is_alive()
    pusher.join(timeout=300)

    assert push_was_running, "the push ended before the renewal: make the image larger"
    assert "error" not in outcome, outcome.get("error")
    assert "+ service nginx (reloaded)" in renewal.stdout
    assert summary_line(renewal.stdout, "renew-certs: ").startswith(
        "renew-certs: 1 certificate renewed"
    )
    after = served_certificate(main_host)
    assert after.serial_number != before.serial_number
    assert fingerprint(after) == fingerprint(leaf_on_disk(main_host))
    assert main_host.pids()["nginx"] == nginx_pid
    assert skopeo.digest("root/big", "big") == image.manifest_digest
    print(
        f"forced renewal: {renewal_seconds:.1f} s, during a {image.size >> 20} MiB push "
        f"of {outcome['seconds']:.1f} s"
    )


def wait_for(condition, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


# --- registry on a domain of its own -----------------------------------------------------


def test_registry_on_its_own_domain_gets_a_certificate_of_its_own(tmp_path):
    """First with the CA unable to reach the challenge (the placeholder keeps serving and
    reconfigure fails naming the host), then with a working CA."""
    http_port = free_port()
    with (
        PebbleServer(tmp_path / "unreachable", http01_port=free_port()) as unreachable,
        PebbleServer(tmp_path / "pebble", http01_port=http_port) as pebble,
    ):
        appliance = ApplianceUnderTest.create(
            {
                "external_url": "https://gitlab.test",
                "registry_external_url": f"https://registry.test:{free_port()}",
                "nginx": {"http_port": http_port},
                "letsencrypt": lets_encrypt(unreachable),
            },
            prefix="appliance-le-own-",
        )
        try:
            failed = appliance.reconfigure(check=False)
            assert failed.returncode == 1, failed
            assert "The CA could not validate registry.test" in failed.stderr
            assert f"({appliance.certificate}) was kept and is still served" in failed.stderr
            placeholder = served_certificate(appliance)
            assert pki.certificate_info(appliance.certificate.read_bytes()).self_signed
            assert fingerprint(placeholder) == fingerprint(leaf_on_disk(appliance))

            appliance.write_config({"letsencrypt": lets_encrypt(pebble)})
            started = time.monotonic()
            issued = appliance.reconfigure()
            seconds = time.monotonic() - started
            assert "+ service nginx (reloaded)" in issued.stdout
            info = pki.certificate_info(appliance.certificate.read_bytes())
            assert appliance.certificate.name == "registry.test.crt"
            assert info.dns_names == ("registry.test",)
            assert not (appliance.root / "etc/appliance/ssl/gitlab.test.crt").exists()
            # Checked at once: reconfigure returns when nginx serves the new certificate.
            assert fingerprint(served_certificate(appliance)) == fingerprint(
                leaf_on_disk(appliance)
            )
            assert verified_handshake(appliance, pebble.root_cert_pem()) == "registry.test"

            skopeo = client(appliance, pebble, tmp_path / "client")
            image = build_image(tmp_path / "image", tag="v1")
            skopeo.push(image, "root/own-domain", "v1")
            assert skopeo.list_tags("root/own-domain") == ["v1"]
            print(f"reconfigure issuing for registry.test: {seconds:.1f} s")
        finally:
            appliance.destroy()


def test_the_renewer_runs_under_supervisord(main_host):
    pids = main_host.wait_until_running(("nginx", "registry", "auth", "renewer"))
    assert pids["renewer"] > 0
    log = main_host.root / "var/log/appliance/renewer/current"
    wait_for(lambda: log.exists() and "renewer: next check at" in log.read_text(), timeout=10)
    assert "order from" not in log.read_text()  # twice a day: it sleeps until its slot


def test_the_renewer_orders_only_what_is_due(tmp_path):
    """The renewer on a one-second schedule: passes with nothing due order nothing; once
    the window covers the certificate (settings re-read each pass) it renews on its own
    and nginx serves the new certificate."""
    http_port = free_port()
    with PebbleServer(tmp_path / "pebble", http01_port=http_port) as pebble:
        appliance = ApplianceUnderTest.create(
            {
                "external_url": "https://appliance.test",
                "registry_external_url": f"https://appliance.test:{free_port()}",
                "nginx": {"http_port": http_port},
                "letsencrypt": {**lets_encrypt(pebble), "runs_per_day": 86400},
            },
            prefix="appliance-le-renewer-",
        )
        try:
            appliance.reconfigure()
            first = appliance.certificate.read_bytes()
            attempts = appliance.root / "var/log/appliance/renewer"

            def passes() -> list[str]:
                return [p.read_text() for p in sorted(attempts.glob("*.log"))]

            wait_for(lambda: len(passes()) >= 3, timeout=20)
            assert all("renew-certs: 0 certificates renewed" in text for text in passes()), [
                text for text in passes() if "renew-certs: 0 certificates renewed" not in text
            ]
            assert appliance.certificate.read_bytes() == first

            appliance.write_config({"letsencrypt": {"renew_before_days": 3650}})
            wait_for(lambda: any("1 certificate renewed" in text for text in passes()), timeout=30)
            renewed = [text for text in passes() if "1 certificate renewed" in text][0]
            assert "within the renewal window" in renewed
            assert "+ service nginx (reloaded)" in renewed
            assert appliance.certificate.read_bytes() != first
            # It renews every pass now; between two passes nginx serves the file's.
            wait_for(
                lambda: (
                    fingerprint(served_certificate(appliance))
                    == fingerprint(leaf_on_disk(appliance))
                ),
                timeout=10,
            )
        finally:
            appliance.destroy()
