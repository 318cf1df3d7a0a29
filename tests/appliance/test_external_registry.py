"""The guide's "external container registry with GitLab as its auth endpoint": the
appliance runs only its token service (registry.enable: false, auth.enable: true) and a
registry it does not manage trusts its tokens."""

from __future__ import annotations

import ssl
import time
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


def test_key_rotation_waits_for_the_external_registry_to_trust_the_new_key(
    appliance, tmp_path: Path
):
    """rotate-token-key stops after step 1 (the bundle to copy), --continue switches the
    token service, a token of the old key keeps working until --finish."""
    import jwt

    auth = load_auth_config(appliance.root / "var/opt/appliance/auth/config.json")
    registry = Registry(tmp_path / "rotating-registry", auth).start()
    scope = "repository:root/rotated:pull,push"

    def v2_status(token: str) -> int:
        request = urllib.request.Request(
            f"http://{registry.address}/v2/", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def kid() -> str:
        return jwt.get_unverified_header(appliance.token(scope))["kid"]

    try:
        old_token, old_kid = appliance.token(scope), kid()
        step_one = appliance.ctl("rotate-token-key").stdout
        assert "Step 1 of 2 done" in step_one
        assert "then run appliance-ctl rotate-token-key --continue" in step_one
        assert kid() == old_kid  # not before the external registry trusts the new key
        bundle = auth.signing_certificate.read_text()
        assert bundle.count("BEGIN CERTIFICATE") == 2

        again = appliance.ctl("rotate-token-key", check=False)
        assert again.returncode == 2
        assert "A rotation waits for the external registry" in again.stderr

        registry.stop()
        registry.start()  # the admin's copy of the bundle and restart
        switched = appliance.ctl("rotate-token-key", "--continue").stdout
        assert "The token service signs with the new key" in switched
        deadline = time.monotonic() + 15
        while kid() == old_kid and time.monotonic() < deadline:
            time.sleep(0.2)
        new_token = appliance.token(scope)
        assert jwt.get_unverified_header(new_token)["kid"] != old_kid
        assert v2_status(new_token) == 200
        assert v2_status(old_token) == 200  # the old key is still trusted

        finished = appliance.ctl("rotate-token-key", "--finish", "--force").stdout
        assert "to drop the old certificate there too" in finished
        assert auth.signing_certificate.read_text().count("BEGIN CERTIFICATE") == 1
        registry.stop()
        registry.start()
        assert v2_status(old_token) == 401
        assert v2_status(appliance.token(scope)) == 200
    finally:
        registry.stop()
