"""The real thing: `appliance-auth` (gunicorn, 2 workers) issuing tokens to a real
`docker-registry serve`, exercised with skopeo and oras as a user would."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import oras.auth.utils
import oras.client
import pytest

from appliance.auth import credentials
from appliance.auth.store import Store
from tests.support.auth_registry import Registry
from tests.support.auth_server import AuthServer, make_config
from tests.support.oci import build_image
from tests.support.skopeo import Skopeo, SkopeoError

PASSWORDS = {
    "dev": "developer password",
    "rep": "reporter password",
    "maint": "maintainer password",
    "root": "administrator password",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("auth-stack")
    # Generous sign-in limits: the cache test below sends many refused requests on purpose.
    config = make_config(
        directory / "auth",
        workers=2,
        rate_limit_user_failures=1000,
        rate_limit_address_failures=1000,
    )
    store = Store(config.database)
    for name, password in PASSWORDS.items():
        store.create_user(name, credentials.hash_password(password), admin=name == "root")
    store.create_project("team/app", "private", True)
    store.create_project("team/base", "public", True)
    store.add_member("team/app", "dev", "developer")
    store.add_member("team/app", "rep", "reporter")
    store.add_member("team/app", "maint", "maintainer")
    store.add_member("team/base", "dev", "developer")
    server = AuthServer(config, directory / "auth.json").start()
    registry = Registry(directory / "registry", config).start()
    try:
        yield directory, config, store, server, registry
    finally:
        registry.stop()
        server.stop()


def skopeo(stack, name: str, user: str | None, password: str | None = None) -> Skopeo:
    directory, *_, registry = stack
    if user is not None and password is None:
        password = PASSWORDS[user]
    return Skopeo(directory / "clients" / name, registry.address, user, password)


def test_server_runs_the_configured_workers(stack) -> None:
    *_, server, _ = stack
    assert len(server.worker_pids()) == 2


def test_developer_pushes_and_pulls(stack, tmp_path: Path) -> None:
    image = build_image(tmp_path / "image")
    dev = skopeo(stack, "dev-push", "dev")
    dev.push(image, "team/app", "v1")
    pulled = dev.pull("team/app", "v1", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest


def test_reporter_push_is_refused_with_a_readable_message(stack, tmp_path: Path) -> None:
    _, config, *_ = stack
    image = build_image(tmp_path / "image")
    with pytest.raises(SkopeoError) as refused:
        skopeo(stack, "rep-push", "rep").push(image, "team/app", "nope")
    assert "requested access to the resource is denied" in refused.value.stderr
    records = [json.loads(line) for line in config.audit_log.read_text().splitlines()]
    mine = [r for r in records if r["user"] == "rep" and "push" in ",".join(r["requested"])]
    assert mine[-1]["granted"] == ["repository:team/app:pull"]
    assert "role reporter in project team/app allows only pull" in mine[-1]["reason"]


def test_wrong_password_is_reported_by_skopeo(stack, tmp_path: Path) -> None:
    with pytest.raises(SkopeoError) as refused:
        skopeo(stack, "bad", "dev", "not the password").list_tags("team/app")
    assert "Invalid username or password" in refused.value.stderr


def test_anonymous_pull_of_a_public_project(stack, tmp_path: Path) -> None:
    image = build_image(tmp_path / "image")
    skopeo(stack, "dev-base", "dev").push(image, "team/base", "1.0")
    anonymous = skopeo(stack, "anon", None)
    assert anonymous.pull("team/base", "1.0", tmp_path / "pulled").manifest_digest == (
        image.manifest_digest
    )
    with pytest.raises(SkopeoError):
        anonymous.list_tags("team/app")


def test_maintainer_deletes(stack, tmp_path: Path) -> None:
    image = build_image(tmp_path / "image")
    skopeo(stack, "dev-del", "dev").push(image, "team/app", "doomed")
    with pytest.raises(SkopeoError):  # a developer may not delete
        skopeo(stack, "dev-del2", "dev").delete("team/app", "doomed")
    maint = skopeo(stack, "maint", "maint")
    maint.delete("team/app", "doomed")
    with pytest.raises(SkopeoError, match="manifest unknown"):
        maint.inspect("team/app", "doomed")


def test_personal_access_token_and_deploy_token_as_passwords(stack, tmp_path: Path) -> None:
    _, _, store, *_ = stack
    _, pat = store.create_personal_access_token("dev", "ci", ["write_registry"], None)
    image = build_image(tmp_path / "image")
    skopeo(stack, "pat", "dev", pat).push(image, "team/app", "from-pat")
    deploy, secret = store.create_deploy_token("team/app", "cluster", ["read_registry"], None)
    robot = skopeo(stack, "deploy", deploy.username, secret)
    assert robot.digest("team/app", "from-pat") == image.manifest_digest
    with pytest.raises(SkopeoError, match="denied"):
        robot.push(build_image(tmp_path / "other"), "team/app", "robot")


def test_password_change_reaches_every_worker_at_once(stack) -> None:
    _, config, store, server, _ = stack
    store.create_user("erin", credentials.hash_password("erin old password"))
    url = f"{server.url}/jwt/auth?service={config.service}"

    def status(password: str) -> int:
        request = urllib.request.Request(url)
        auth = base64.b64encode(f"erin:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {auth}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    workers = set(server.worker_pids())

    def answered_by(password: str, most: int = 80) -> tuple[set[int], set[int]]:
        """Concurrent requests in small batches until every worker has answered."""
        before = len(config.audit_log.read_text().splitlines())
        statuses: set[int] = set()
        pids: set[int] = set()
        with ThreadPoolExecutor(4) as pool:
            for _ in range(0, most, 4):
                statuses |= set(pool.map(status, [password] * 4))
                lines = config.audit_log.read_text().splitlines()[before:]
                pids = {json.loads(line)["pid"] for line in lines}
                if pids == workers:
                    break
        return statuses, pids

    statuses, pids = answered_by("erin old password")
    assert statuses == {200}
    assert pids == workers  # both workers now hold it in their cache
    store.set_password_hash("erin", credentials.hash_password("erin new password"))
    statuses, pids = answered_by("erin old password")
    assert statuses == {401}
    assert pids == workers
    assert status("erin new password") == 200


def test_token_with_only_the_libtrust_kid_is_accepted(stack) -> None:
    """distribution 2.8 checks a kid against its rootcertbundle with libtrust's key ID:
    the strongest check that our kid computation is libtrust's."""
    _, config, _, server, registry = stack
    request = urllib.request.Request(
        f"{server.url}/jwt/auth?service={config.service}&scope=repository:team/base:pull"
    )
    with urllib.request.urlopen(request) as response:
        token = json.loads(response.read())["token"]
    header_segment, payload, signature = token.split(".")
    header = jwt.get_unverified_header(token)
    assert set(header) == {"typ", "alg", "kid", "x5c"}
    # Same signature input is needed, so re-sign the claims with only the kid.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(config.signing_key.read_bytes(), password=None)
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    kid_only = jwt.encode(claims, key, algorithm="ES256", headers={"kid": header["kid"]})
    forged_kid = jwt.encode(
        claims, key, algorithm="ES256", headers={"kid": "AAAA:" + header["kid"][5:]}
    )

    def tags(bearer: str) -> int:
        request = urllib.request.Request(f"http://{registry.address}/v2/team/base/tags/list")
        request.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(request) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert tags(token) == 200
    assert tags(kid_only) == 200
    assert tags(forged_kid) == 401


def test_oras_pushes_and_pulls_an_artifact(stack, tmp_path: Path, monkeypatch) -> None:
    _, config, *_, registry = stack
    monkeypatch.setenv("HOME", str(tmp_path))  # oras must not touch the real ~/.docker
    monkeypatch.chdir(tmp_path)  # oras only uploads files below the working directory
    (tmp_path / "artifact.txt").write_text("hello from oras\n")
    target = f"{registry.address}/team/app:artifact"

    writer = oras.client.OrasClient(hostname=registry.address, insecure=True, tls_verify=False)
    writer.auth.set_basic_auth("dev", PASSWORDS["dev"])
    # oras-py 0.2 keeps the token of its first (pull-scoped) blob check and re-sends it
    # after the registry's insufficient_scope 401 on upload. Ask for pull,push up front,
    # as docker does, through oras's own token request to our endpoint.
    challenge = oras.auth.utils.authHeader(
        {
            "realm": config.realm,
            "service": config.service,
            "scope": "repository:team/app:pull,push",
        }
    )
    writer.auth.set_token_auth(writer.auth.request_token(challenge))
    writer.push(target=target, files=["artifact.txt"])

    reader = oras.client.OrasClient(hostname=registry.address, insecure=True, tls_verify=False)
    reader.auth.set_basic_auth("rep", PASSWORDS["rep"])
    files = reader.pull(target=target, outdir=str(tmp_path / "out"))
    assert [Path(f).read_text() for f in files] == ["hello from oras\n"]

    # The refused case through oras: a reporter's pull,push request yields a pull-only token.
    refused = oras.client.OrasClient(hostname=registry.address, insecure=True, tls_verify=False)
    refused.auth.set_basic_auth("rep", PASSWORDS["rep"])
    refused.auth.set_token_auth(refused.auth.request_token(challenge))
    with pytest.raises(ValueError, match="(?i)unauthorized"):
        refused.push(target=f"{registry.address}/team/app:reporter", files=["artifact.txt"])


def test_audit_log_is_one_json_object_per_line(stack) -> None:
    _, config, *_ = stack
    lines = config.audit_log.read_text().splitlines()
    assert len(lines) > 10
    for line in lines:
        record = json.loads(line)
        assert {"time", "user", "client", "requested", "granted", "result", "reason"} <= set(record)
