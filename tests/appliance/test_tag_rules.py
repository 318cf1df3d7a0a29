"""Immutable and protected tags on the whole appliance, with skopeo and oras as clients.

One appliance: project team/app with immutable tags `^v[0-9]+\\.` and `latest`
protected for maintainers, project team/free with no rule at all. Every write goes
through nginx's TLS vhost, the token service's gate and the real registry; what a test
asserts is what the client printed and what the registry then holds.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import oras.auth.utils
import oras.client
import pytest
import requests

from tests.support.appliance import ApplianceUnderTest
from tests.support.counting_client import MANIFEST_TYPE, Registry
from tests.support.oci import build_image
from tests.support.skopeo import SkopeoError

PASSWORDS = {"dev": "developer's password", "maint": "maintainer's password"}
IMMUTABLE = r"^v[0-9]+\."


@pytest.fixture(scope="module")
def appliance():
    # The registry on its socket: the auth service (its own account, when the tests run
    # as root) must reach it there to learn what a tag points at.
    appliance = ApplianceUnderTest.create(
        {"auth": {"max_failed_logins": 1000}, "registry": {"listen_network": "unix"}},
        prefix="tags-",
    )
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        for name, password in PASSWORDS.items():
            appliance.ctl("user", "create", name, "--password-stdin", input=password + "\n")
        for path in ("team/app", "team/free"):
            appliance.ctl("project", "create", path)
            appliance.ctl("member", "add", path, "dev", "developer")
            appliance.ctl("member", "add", path, "maint", "maintainer")
        appliance.ctl(
            "project",
            "update",
            "team/app",
            "--immutable-tags",
            IMMUTABLE,
            "--protected-tags",
            "latest=maintainer",
        )
        yield appliance
    finally:
        appliance.destroy()


def skopeo(appliance: ApplianceUnderTest, home: Path, user: str):
    return appliance.skopeo(home, username=user, password=PASSWORDS[user])


# -- the admin's commands ---------------------------------------------------------------
def test_project_show_lists_the_rules(appliance):
    out = appliance.ctl("project", "show", "team/app").stdout
    assert f"Immutable tags of team/app: '{IMMUTABLE}'" in out
    assert "Protected tags of team/app: 'latest=maintainer'" in out
    assert (
        "Immutable tags of team/free: none" in appliance.ctl("project", "show", "team/free").stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--immutable-tags", "^v[0-9"), "--immutable-tags '^v[0-9' is not a valid regular"),
        (("--protected-tags", "latest"), "--protected-tags 'latest' is not PATTERN=ROLE"),
        (("--protected-tags", "latest=wizard"), "'wizard' is not a role that may push"),
        (("--immutable-tags", "none", "--immutable-tags", "^v"), "give it alone"),
    ],
)
def test_a_bad_rule_is_one_sentence_exit_2_and_nothing_written(appliance, args, message):
    before = appliance.ctl("project", "show", "team/app").stdout
    # A valid change beside the bad one is not written either.
    result = appliance.ctl(
        "project", "update", "team/app", "--visibility", "public", *args, check=False
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert appliance.ctl("project", "show", "team/app").stdout == before


# -- immutable tags, with skopeo --------------------------------------------------------
def test_an_immutable_tag_never_moves_and_the_same_digest_may_be_pushed_again(appliance, tmp_path):
    dev = skopeo(appliance, tmp_path / "dev", "dev")
    first = build_image(tmp_path / "first", tag="v1.0.0")
    other = build_image(tmp_path / "other", tag="v1.0.0")
    dev.push(first, "team/app", "v1.0.0")
    with pytest.raises(SkopeoError) as refused:
        dev.push(other, "team/app", "v1.0.0")
    assert "tag v1.0.0 is immutable in team/app" in refused.value.stderr
    assert dev.digest("team/app", "v1.0.0") == first.manifest_digest
    dev.push(first, "team/app", "v1.0.0")  # CI pushing the same build again
    assert dev.digest("team/app", "v1.0.0") == first.manifest_digest


def test_the_manifest_of_an_immutable_tag_cannot_be_deleted(appliance, tmp_path):
    maint = skopeo(appliance, tmp_path / "maint", "maint")
    image = build_image(tmp_path / "image", tag="v2.0.0")
    maint.push(image, "team/app", "v2.0.0")
    with pytest.raises(SkopeoError) as refused:
        maint.delete("team/app", "v2.0.0")  # skopeo deletes by the tag's digest
    assert "tag v2.0.0 is immutable in team/app" in refused.value.stderr
    assert maint.digest("team/app", "v2.0.0") == image.manifest_digest


def test_mutable_tags_move_and_are_deleted_as_before(appliance, tmp_path):
    dev, maint = (
        skopeo(appliance, tmp_path / "dev", "dev"),
        skopeo(appliance, tmp_path / "m", "maint"),
    )
    one, two = build_image(tmp_path / "one", tag="x"), build_image(tmp_path / "two", tag="x")
    for tag in ("main", "v1"):  # 'v1' has no dot: the pattern does not match it
        dev.push(one, "team/app", tag)
        dev.push(two, "team/app", tag)
        assert dev.digest("team/app", tag) == two.manifest_digest
    maint.delete("team/app", "main")
    with pytest.raises(SkopeoError, match="manifest unknown"):
        maint.inspect("team/app", "main")


def test_a_project_without_rules_is_unaffected(appliance, tmp_path):
    dev, maint = (
        skopeo(appliance, tmp_path / "dev", "dev"),
        skopeo(appliance, tmp_path / "m", "maint"),
    )
    one, two = build_image(tmp_path / "one", tag="x"), build_image(tmp_path / "two", tag="x")
    dev.push(one, "team/free", "v1.0.0")
    dev.push(two, "team/free", "v1.0.0")
    dev.push(two, "team/free", "latest")
    assert dev.digest("team/free", "v1.0.0") == two.manifest_digest
    maint.delete("team/free", "v1.0.0")
    with pytest.raises(SkopeoError, match="manifest unknown"):
        maint.inspect("team/free", "latest")  # the same manifest: gone with it


# -- protected tags ---------------------------------------------------------------------
def test_latest_is_pushed_by_maintainers_not_developers(appliance, tmp_path):
    dev, maint = (
        skopeo(appliance, tmp_path / "dev", "dev"),
        skopeo(appliance, tmp_path / "m", "maint"),
    )
    image = build_image(tmp_path / "image", tag="latest")
    with pytest.raises(SkopeoError) as refused:
        dev.push(image, "team/app", "latest")
    assert "tag latest is protected in team/app" in refused.value.stderr
    assert "maintainer role or above" in refused.value.stderr
    maint.push(image, "team/app", "latest")
    assert dev.digest("team/app", "latest") == image.manifest_digest
    refusal = [
        json.loads(line)
        for line in (appliance.root / "var/log/appliance/audit/audit.log").read_text().splitlines()
        if '"result":"refused"' in line
    ][-1]
    assert refusal["user"] == "dev" and refusal["status"] == 403
    assert refusal["path"] == "/v2/team/app/manifests/latest"
    assert refusal["reason"].startswith("tag latest is protected in team/app")
    # re.search: an unanchored 'latest' guards every tag that contains it.
    with pytest.raises(SkopeoError, match="tag latest-rc is protected"):
        dev.push(image, "team/app", "latest-rc")


def test_a_deploy_token_pushes_as_a_developer(appliance, tmp_path):
    out = appliance.ctl(
        "deploy-token", "create", "team/app", "--name", "ci", "--scope", "write_registry"
    ).stdout
    username = re.search(r"^username: (\S+)$", out, re.M).group(1)
    password = re.search(r"^password: (\S+)$", out, re.M).group(1)
    robot = appliance.skopeo(tmp_path / "robot", username=username, password=password)
    image = build_image(tmp_path / "image", tag="x")
    robot.push(image, "team/app", "build-1")
    with pytest.raises(SkopeoError, match="tag latest is protected in team/app"):
        robot.push(image, "team/app", "latest")


def test_a_maintainer_may_not_delete_what_an_owner_protects(appliance, tmp_path):
    appliance.ctl("project", "create", "team/owned")
    appliance.ctl("member", "add", "team/owned", "maint", "maintainer")
    appliance.ctl("project", "update", "team/owned", "--protected-tags", "^stable$=owner")
    maint = skopeo(appliance, tmp_path / "m", "maint")
    image = build_image(tmp_path / "image", tag="x")
    maint.push(image, "team/owned", "candidate")
    root = appliance.skopeo(tmp_path / "root")
    root.push(image, "team/owned", "stable")  # an administrator ranks above every role
    with pytest.raises(SkopeoError, match="tag stable is protected in team/owned"):
        maint.delete("team/owned", "candidate")  # the same manifest as stable
    maint.push(image, "team/owned", "stable-2")  # anchored: only 'stable' itself


# -- the registry API as any client speaks it ----------------------------------------------
def token(appliance: ApplianceUnderTest, user: str, repository: str, actions: str) -> str:
    reply = requests.get(
        f"https://{appliance.registry_address}/jwt/auth",
        params={"service": "container_registry", "scope": f"repository:{repository}:{actions}"},
        auth=(user, PASSWORDS.get(user, appliance.password)),
        verify=str(appliance.certificate),
        timeout=30,
    )
    reply.raise_for_status()
    return reply.json()["token"]


def manifest_url(appliance: ApplianceUnderTest, repository: str, reference: str) -> str:
    return f"https://{appliance.registry_address}/v2/{repository}/manifests/{reference}"


def manifest_with_blobs(appliance: ApplianceUnderTest, repository: str) -> dict:
    """A manifest whose config and layer are in the registry (pushed as root)."""
    registry = Registry(appliance)
    conn = registry.client()
    try:
        bearer = registry.token(conn, repository)
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        layer = b"layer of " + repository.encode()
        return {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": registry.push_blob(conn, bearer, repository, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": registry.push_blob(conn, bearer, repository, layer),
                    "size": len(layer),
                }
            ],
        }
    finally:
        conn.close()


def variant(manifest: dict, name: str) -> bytes:
    """The same image with an annotation: another manifest, another digest."""
    return json.dumps({**manifest, "annotations": {"variant": name}}).encode()


def put_manifest(appliance, bearer: str, repository: str, tag: str, body: bytes):
    return requests.put(
        manifest_url(appliance, repository, tag),
        data=body,
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": MANIFEST_TYPE},
        verify=str(appliance.certificate),
        timeout=60,
    )


def test_two_concurrent_first_pushes_of_an_immutable_tag_exactly_one_wins(appliance):
    manifest = manifest_with_blobs(appliance, "team/app")
    bearer = token(appliance, "dev", "team/app", "pull,push")
    for round_ in range(5):
        tag = f"v3.0.{round_}"
        bodies = [variant(manifest, f"{round_}-a"), variant(manifest, f"{round_}-b")]
        start = threading.Barrier(2)
        statuses: dict[int, object] = {}

        def push(
            index: int, tag: str = tag, bodies: list = bodies, start=start, statuses=statuses
        ) -> None:
            start.wait()
            statuses[index] = put_manifest(appliance, bearer, "team/app", tag, bodies[index])

        threads = [threading.Thread(target=push, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = sorted(reply.status_code for reply in statuses.values())
        assert codes == [201, 403], [(r.status_code, r.text) for r in statuses.values()]
        [winner] = [i for i, reply in statuses.items() if reply.status_code == 201]
        [loser] = [reply for reply in statuses.values() if reply.status_code == 403]
        assert f"tag {tag} is immutable in team/app" in loser.json()["errors"][0]["message"]
        stored = requests.head(
            manifest_url(appliance, "team/app", tag),
            headers={"Authorization": f"Bearer {bearer}", "Accept": MANIFEST_TYPE},
            verify=str(appliance.certificate),
            timeout=30,
        ).headers["Docker-Content-Digest"]
        assert stored == "sha256:" + hashlib.sha256(bodies[winner]).hexdigest()


def test_a_push_whose_manifest_was_refused_holds_the_tag_only_briefly(appliance):
    """The registry refuses a manifest naming a blob it lacks: the tag stays free of it,
    but the reservation keeps other digests out for RESERVATION_SECONDS (60 s), as for
    a push still in flight; the same digest may be pushed again at once."""
    manifest = manifest_with_blobs(appliance, "team/app")
    bearer = token(appliance, "dev", "team/app", "pull,push")
    broken = dict(manifest, layers=[{**manifest["layers"][0], "digest": "sha256:" + "0" * 64}])
    failed = put_manifest(appliance, bearer, "team/app", "v4.0.0", json.dumps(broken).encode())
    assert failed.status_code == 400  # MANIFEST_BLOB_UNKNOWN, from the registry
    other = put_manifest(appliance, bearer, "team/app", "v4.0.0", variant(manifest, "later"))
    assert other.status_code == 403
    assert "another push of it" in other.json()["errors"][0]["message"]


def test_deleting_an_immutable_manifest_by_digest_answers_an_oci_error(appliance):
    manifest = manifest_with_blobs(appliance, "team/app")
    body = variant(manifest, "delete-me")
    pusher = token(appliance, "maint", "team/app", "pull,push")
    assert put_manifest(appliance, pusher, "team/app", "v6.0.0", body).status_code == 201
    assert put_manifest(appliance, pusher, "team/app", "scratch", body).status_code == 201
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    deleter = token(appliance, "maint", "team/app", "*")
    reply = requests.delete(
        manifest_url(appliance, "team/app", digest),
        headers={"Authorization": f"Bearer {deleter}"},
        verify=str(appliance.certificate),
        timeout=30,
    )
    assert reply.status_code == 403
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json()["errors"][0] == {
        "code": "DENIED",
        "message": f"tag v6.0.0 is immutable in team/app (rule '{IMMUTABLE}'): its manifest"
        f" {digest} cannot be deleted",
        "detail": None,
    }


def test_without_a_valid_token_the_registry_answers_as_before(appliance):
    """The gate refuses only what the registry would accept: an anonymous or forged
    write learns nothing about a tag (401 from the registry, not 403 from the rules)."""
    body = variant(manifest_with_blobs(appliance, "team/app"), "anonymous")
    assert put_manifest(appliance, "not.a.token", "team/app", "v1.0.0", body).status_code == 401
    reader = token(appliance, "dev", "team/app", "pull")
    assert put_manifest(appliance, reader, "team/app", "v1.0.0", body).status_code == 401


# -- oras, a second client ----------------------------------------------------------------
def oras_client(appliance: ApplianceUnderTest, user: str) -> oras.client.OrasClient:
    address = appliance.registry_address
    client = oras.client.OrasClient(hostname=address, tls_verify=str(appliance.certificate))
    client.auth.set_basic_auth(user, PASSWORDS[user])
    # oras-py 0.2 re-sends its first token after a push 401 (DESIGN.md): ask for push first.
    challenge = oras.auth.utils.authHeader(
        {
            "realm": f"https://{address}/jwt/auth",
            "service": "container_registry",
            "scope": "repository:team/app:pull,push",
        }
    )
    client.auth.set_token_auth(client.auth.request_token(challenge))
    return client


def test_oras_pushes_an_immutable_tag_once(appliance, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # oras uploads only files below the working directory
    target = f"{appliance.registry_address}/team/app:v7.0.0"
    Path("artifact.txt").write_text("first\n")
    dev = oras_client(appliance, "dev")
    assert dev.push(target=target, files=["artifact.txt"]).status_code == 201
    assert dev.push(target=target, files=["artifact.txt"]).status_code == 201  # same digest
    Path("artifact.txt").write_text("second\n")
    with pytest.raises(Exception) as refused:  # noqa: PT011 - oras-py raises ValueError
        dev.push(target=target, files=["artifact.txt"])
    assert "Forbidden" in str(refused.value)
    # What oras-py prints: the OCI error's message, on its logger.
    assert "tag v7.0.0 is immutable in team/app" in caplog.text
    files = dev.pull(target=target, outdir=str(tmp_path / "out"))
    assert [Path(f).read_text() for f in files] == ["first\n"]


def test_oras_push_of_a_protected_tag_needs_the_role(appliance, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    Path("artifact.txt").write_text("for latest\n")
    target = f"{appliance.registry_address}/team/app:latest"
    with pytest.raises(Exception) as refused:  # noqa: PT011 - oras-py raises ValueError
        oras_client(appliance, "dev").push(target=target, files=["artifact.txt"])
    assert "Forbidden" in str(refused.value)
    assert "tag latest is protected in team/app" in caplog.text
    assert oras_client(appliance, "maint").push(target=target, files=["artifact.txt"]).ok


INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


def test_a_multi_arch_image_under_an_immutable_tag_keeps_its_platform_manifests(appliance):
    """An index is pushed as its platform manifests (by digest: no tag, no rule) and the
    index under the tag. Deleting one platform manifest would break the image: refused
    like the index itself; the same index pushed again passes."""
    manifest = manifest_with_blobs(appliance, "team/app")
    bearer = token(appliance, "maint", "team/app", "pull,push")
    children = []
    for arch in ("amd64", "arm64"):
        body = variant(manifest, arch)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        assert put_manifest(appliance, bearer, "team/app", digest, body).status_code == 201
        children.append(
            {
                "mediaType": MANIFEST_TYPE,
                "digest": digest,
                "size": len(body),
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": children}
    ).encode()

    def put_index() -> requests.Response:
        return requests.put(
            manifest_url(appliance, "team/app", "v8.0.0"),
            data=index,
            headers={"Authorization": f"Bearer {bearer}", "Content-Type": INDEX_TYPE},
            verify=str(appliance.certificate),
            timeout=60,
        )

    assert put_index().status_code == 201
    assert put_index().status_code == 201  # the same index again
    deleter = token(appliance, "maint", "team/app", "*")
    for reference in (children[1]["digest"], "sha256:" + hashlib.sha256(index).hexdigest()):
        reply = requests.delete(
            manifest_url(appliance, "team/app", reference),
            headers={"Authorization": f"Bearer {deleter}"},
            verify=str(appliance.certificate),
            timeout=30,
        )
        assert reply.status_code == 403, reply.text
        assert "tag v8.0.0 is immutable in team/app" in reply.json()["errors"][0]["message"]
