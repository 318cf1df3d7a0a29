"""The guide's "external container registry with GitLab as its auth endpoint": the
appliance runs only its token service (registry.enable: false, auth.enable: true) and a
registry it does not manage trusts its tokens."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.appliance import ApplianceUnderTest, free_port
from tests.support.oci import build_image
from tests.support.skopeo import Skopeo, SkopeoError


@pytest.fixture(scope="module")
def appliance():
    appliance = ApplianceUnderTest.create({"registry": {"enable": False},
                                           "auth": {"enable": True}})
    try:
        appliance.first_output = appliance.reconfigure().stdout
        yield appliance
    finally:
        appliance.destroy()


@pytest.fixture(scope="module")
def external_registry(appliance, tmp_path_factory):
    """A docker-registry of its own, configured the way the guide's external one is."""
    work = tmp_path_factory.mktemp("external-registry")
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(work / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "external"},
        "auth": {"token": {
            "realm": f"https://{appliance.registry_address}/jwt/auth",
            "service": "container_registry",
            "issuer": "appliance-issuer",
            "rootcertbundle": str(appliance.root / "var/opt/appliance/auth/token-signing.crt"),
        }},
    }
    (work / "config.yml").write_text(yaml.safe_dump(config))
    log = open(work / "registry.log", "w")
    process = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, (work / "registry.log").read_text()
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)
    log.close()


def status_of(appliance: ApplianceUnderTest, path: str) -> int:
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    try:
        with urllib.request.urlopen(f"https://{appliance.registry_address}{path}",
                                    context=context, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_only_the_token_service_runs_and_says_where_its_bundle_is(appliance):
    pids = appliance.wait_until_running(("nginx", "auth"))
    assert "registry" not in pids
    assert "Token service for an external registry" in appliance.first_output
    assert "token-signing.crt" in appliance.first_output
    assert status_of(appliance, "/-/health") == 200
    assert status_of(appliance, "/v2/") == 404  # no registry behind this vhost


def test_external_registry_trusts_the_tokens(appliance, external_registry, tmp_path: Path):
    # The appliance's certificate is self-signed; the external registry here is plain HTTP.
    client = Skopeo(home=tmp_path / "client", registry=external_registry, username="root",
                    password=appliance.password, cert_dir=None)
    image = build_image(tmp_path / "image", tag="v1")
    client.push(image, "root/outside", "v1")
    pulled = client.pull("root/outside", "v1", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest

    stranger = Skopeo(home=tmp_path / "stranger", registry=external_registry,
                      username="root", password="not-the-password", cert_dir=None)
    with pytest.raises(SkopeoError):
        stranger.push(image, "root/outside", "v2")
