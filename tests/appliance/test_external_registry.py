"""The guide's "external container registry with GitLab as its auth endpoint": the
appliance runs only its token service (registry.enable: false, auth.enable: true) and a
registry it does not manage trusts its tokens."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from appliance.auth.config import load as load_auth_config
from tests.support.appliance import ApplianceUnderTest
from tests.support.auth_registry import Registry
from tests.support.oci import build_image
from tests.support.skopeo import Skopeo, SkopeoError


@pytest.fixture(scope="module")
def appliance():
    appliance = ApplianceUnderTest.create({"registry": {"enable": False}, "auth": {"enable": True}})
    try:
        appliance.first_output = appliance.reconfigure().stdout
        yield appliance
    finally:
        appliance.destroy()


@pytest.fixture(scope="module")
def external_registry(appliance, tmp_path_factory):
    """A docker-registry of its own, configured the way the guide's external one is:
    realm, service, issuer and rootcertbundle as the appliance's token service has them."""
    auth = load_auth_config(appliance.root / "var/opt/appliance/auth/config.json")
    registry = Registry(tmp_path_factory.mktemp("external-registry"), auth).start()
    yield registry.address
    registry.stop()


def status_of(appliance: ApplianceUnderTest, path: str) -> int:
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    try:
        with urllib.request.urlopen(
            f"https://{appliance.registry_address}{path}", context=context, timeout=10
        ) as response:
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
    client = Skopeo(
        home=tmp_path / "client",
        registry=external_registry,
        username="root",
        password=appliance.password,
        cert_dir=None,
    )
    image = build_image(tmp_path / "image", tag="v1")
    client.push(image, "root/outside", "v1")
    pulled = client.pull("root/outside", "v1", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest

    stranger = Skopeo(
        home=tmp_path / "stranger",
        registry=external_registry,
        username="root",
        password="not-the-password",
        cert_dir=None,
    )
    with pytest.raises(SkopeoError):
        stranger.push(image, "root/outside", "v2")
