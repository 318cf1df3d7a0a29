"""The whole appliance, as an admin and a user meet it.

One appliance under a temporary root (module-scoped: starting it is the slow part):
reconfigure, push and pull with skopeo over the self-signed TLS vhost, the service
commands, supervision (kill -9 brings a service back), idempotence (a second
reconfigure restarts nothing), and a broken config that changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import testinfra

from tests.support.appliance import ApplianceUnderTest
from tests.support.oci import build_image
from tests.support.skopeo import SkopeoError


@pytest.fixture(scope="module")
def appliance() -> ApplianceUnderTest:
    appliance = ApplianceUnderTest.create()
    try:
        first = appliance.reconfigure()
        appliance.first_output = first.stdout
        appliance.wait_until_running()
        yield appliance
    finally:
        appliance.destroy()


@pytest.fixture
def client(appliance: ApplianceUnderTest, tmp_path: Path):
    return appliance.skopeo(tmp_path / "client")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under the config and data trees (not logs, sockets or databases
    that services write on their own)."""
    out = {}
    for top in ("etc/appliance", "var/opt/appliance"):
        for path in sorted((root / top).rglob("*")):
            if (
                path.is_file()
                and not path.is_symlink()
                and path.suffix not in (".sock", ".pid")
                and "registry/data" not in str(path)
                and "auth.db" not in path.name
                and path.name != "reconfigure.lock"
            ):
                out[str(path)] = path.read_bytes()
    return out


def test_first_reconfigure_reports_every_resource_and_how_to_log_in(appliance):
    out = appliance.first_output
    summary = [line for line in out.splitlines() if line.startswith("reconfigure: ")]
    assert summary, out
    updated, total = summary[0].split()[1].split("/")
    assert int(updated) > 0 and int(updated) <= int(total)
    assert f"docker login {appliance.registry_address} -u root" in out


def test_push_pull_list_and_delete(appliance, client, tmp_path):
    image = build_image(tmp_path / "image", tag="v1", random_bytes=256 * 1024)
    client.push(image, "root/hello", "v1")
    client.push(image, "root/hello", "v2")
    assert sorted(client.list_tags("root/hello")) == ["v1", "v2"]

    pulled = client.pull("root/hello", "v1", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.layer_digests == image.layer_digests

    client.delete("root/hello", "v2")
    assert client.list_tags("root/hello") == []  # same manifest: both tags go with it


def test_wrong_password_is_refused(appliance, tmp_path, client):
    image = build_image(tmp_path / "image")
    intruder = appliance.skopeo(tmp_path / "intruder", username="root", password="wrong")
    with pytest.raises(SkopeoError) as refused:
        intruder.push(image, "root/intruder", "v1")
    assert "401" in refused.value.stderr or "unauthorized" in refused.value.stderr.lower()


def test_second_reconfigure_changes_and_restarts_nothing(appliance):
    before = appliance.wait_until_running()
    result = appliance.reconfigure()
    summary = [line for line in result.stdout.splitlines() if line.startswith("reconfigure: ")]
    assert summary and summary[0].startswith("reconfigure: 0/"), result.stdout
    assert "restarted" not in result.stdout and "reloaded" not in result.stdout
    assert appliance.pids() == before


def test_dry_run_writes_nothing(appliance):
    appliance.write_config({"registry": {"log_level": "debug"}})
    before = snapshot(appliance.root)
    try:
        result = appliance.reconfigure("--dry-run")
        assert "would update" in result.stdout
        assert "-  level: info" in result.stdout or "level: debug" in result.stdout
        assert "would reload registry" in result.stdout  # a handover (README, Reliability)
        assert snapshot(appliance.root) == before
    finally:
        appliance.write_config({"registry": {"log_level": "info"}})


def test_broken_config_exits_2_and_changes_nothing(appliance):
    before = snapshot(appliance.root)
    pids = appliance.pids()
    good = appliance.config_file.read_text()
    appliance.config_file.write_text(good + "registry_nginx:\n  listen_port: 99999\nregisty: {}\n")
    try:
        result = appliance.reconfigure(check=False)
    finally:
        appliance.config_file.write_text(good)
    assert result.returncode == 2
    assert "registry_nginx.listen_port" in result.stderr
    assert "did you mean registry?" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(appliance.root) == before
    assert appliance.pids() == pids


def test_changed_registry_setting_hands_over_the_registry_only(appliance):
    before = appliance.wait_until_running()
    serving = appliance.registry_process()
    appliance.write_config({"registry": {"log_level": "debug"}})
    try:
        result = appliance.reconfigure()
        after = appliance.wait_until_running()
        assert "registry (reloaded)" in result.stdout
        assert appliance.registry_process() != serving  # a new registry process
        assert after == before  # no supervised program restarted, nginx and auth included
    finally:
        appliance.write_config({"registry": {"log_level": "info"}})
        appliance.reconfigure()


def test_restart_registry_then_push_again(appliance, client, tmp_path):
    serving = appliance.registry_process()
    result = appliance.ctl("restart", "registry")
    assert "ok: restart registry" in result.stdout
    appliance.wait_until_running()
    assert appliance.registry_process() != serving  # a graceful restart: a new process
    image = build_image(tmp_path / "image", tag="after-restart")
    client.push(image, "root/restarted", "after-restart")
    assert client.list_tags("root/restarted") == ["after-restart"]


@pytest.mark.parametrize("service", ["nginx", "registry", "auth"])
def test_killed_service_comes_back(appliance, service):
    back = appliance.kill_and_wait_back(service)
    # Back for good, not in a start-fail loop (a killed nginx master leaves workers that
    # hold its ports), and answering through the vhost.
    time.sleep(1.5)
    assert appliance.pids()[service] == back
    appliance.wait_listening()
    assert registry_answer(appliance) == 401


def registry_answer(appliance: ApplianceUnderTest) -> int:
    """The status of an anonymous GET /v2/ through the TLS vhost (401: all is wired)."""
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    url = f"https://{appliance.registry_address}/v2/"
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_status_of_unknown_service_names_the_valid_ones(appliance):
    result = appliance.ctl("status", "regsitry", check=False)
    assert result.returncode == 2
    assert "unknown service 'regsitry'" in result.stderr
    assert "nginx, registry, auth" in result.stderr


def test_host_state(appliance):
    """What an admin would check with ls, ss and ps (pytest-testinfra, local backend)."""
    host = testinfra.get_host("local://")
    root = appliance.root
    secrets_file = host.file(str(root / "etc/appliance/appliance-secrets.json"))
    assert secrets_file.mode == 0o600
    key = host.file(str(root / "var/opt/appliance/auth/token-signing.key"))
    assert key.mode == 0o600
    # initial_root_password is set in appliance.yml, so no generated-password file.
    assert not host.file(str(root / "etc/appliance/initial_root_password")).exists
    registry_config = host.file(str(root / "var/opt/appliance/registry/config.yml"))
    assert registry_config.contains("rootcertbundle")
    if os.geteuid() == 0:
        assert key.user == "appliance-auth"
        assert host.process.filter(user="appliance-registry", comm="docker-registry")
    listen = appliance.registry_address.rsplit(":", 1)[1]
    # The token service listens on its socket (auth.listen_network: unix), not on TCP.
    assert host.socket(f"unix://{appliance.auth_internal_address}").is_listening
    assert not host.socket(f"tcp://{appliance.config['auth']['listen_addr']}").is_listening
    for address in (f"127.0.0.1:{listen}", appliance.config["registry"]["http_addr"]):
        deadline = time.monotonic() + 15  # a service the kill test restarted may be binding
        while not host.socket(f"tcp://{address}").is_listening:
            assert time.monotonic() < deadline, f"nothing listens on {address}"
            time.sleep(0.2)
    assert not host.socket(f"tcp://0.0.0.0:{listen}").is_listening


def test_token_key_and_registry_bundle_agree(appliance):
    from appliance import pki

    root = appliance.root
    key = (root / "var/opt/appliance/auth/token-signing.key").read_bytes()
    bundle = (root / "var/opt/appliance/registry/token-bundle.crt").read_bytes()
    assert pki.public_key_matches(bundle, key)
    digest = hashlib.sha256(bundle).hexdigest()
    appliance.reconfigure()
    assert (
        hashlib.sha256(
            (root / "var/opt/appliance/registry/token-bundle.crt").read_bytes()
        ).hexdigest()
        == digest
    )
