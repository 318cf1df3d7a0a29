"""The admin API on a running appliance, through nginx with TLS verified: listings of
what skopeo pushed, a maintainer's tag delete (skopeo then gets manifest unknown), a
reporter's 403 for the same request, and personal access tokens with and without the
`api` scope. The permission matrix as a table: tests/unit/test_api_router.py."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request

import pytest
from openapi_spec_validator import validate

from tests.support.appliance import ApplianceUnderTest, team_app_appliance
from tests.support.oci import build_image, build_index
from tests.support.skopeo import Skopeo, SkopeoError

PASSWORDS = {"rep": "reporter password 1", "maint": "maintainer password 1"}


@pytest.fixture(scope="module")
def appliance():
    roles = {"rep": "reporter", "maint": "maintainer"}
    members = {name: (PASSWORDS[name], role) for name, role in roles.items()}
    with team_app_appliance("appliance-api-", members) as appliance:
        yield appliance


def api(
    appliance: ApplianceUnderTest,
    method: str,
    path: str,
    credentials: tuple[str, str] | None = None,
    body: dict | None = None,
) -> tuple[int, object]:
    """(status, JSON body) of an API request through nginx, the certificate verified."""
    headers = {"Accept": "application/json"}
    if credentials:
        pair = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {pair}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        f"https://{appliance.registry_address}{path}", data=data, method=method, headers=headers
    )
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    try:
        with urllib.request.urlopen(request, context=context, timeout=60) as reply:
            raw = reply.read()
            return reply.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None


def exists(client: Skopeo, repository: str, tag: str) -> bool:
    try:
        client.inspect(repository, tag)
    except SkopeoError as error:
        assert "manifest unknown" in error.stderr, error.stderr
        return False
    return True


def test_listings_show_what_skopeo_pushed(appliance, tmp_path):
    root = appliance.skopeo(tmp_path / "root")
    image = build_image(tmp_path / "image", tag="v1", created="2024-05-01T10:00:00Z")
    root.push(image, "team/app/web", "v1")
    me = ("rep", PASSWORDS["rep"])
    status, projects = api(appliance, "GET", "/api/v1/projects", me)
    assert status == 200 and [p["path"] for p in projects] == ["team/app"]
    assert projects[0]["role"] == "reporter" and projects[0]["can_delete"] is False
    status, repositories = api(appliance, "GET", "/api/v1/projects/team%2Fapp/repositories", me)
    assert status == 200
    assert repositories == [
        {"name": "team/app/web", "project": "team/app", "tags": 1, "size": image.size}
    ]
    status, tags = api(appliance, "GET", "/api/v1/repositories/team%2Fapp%2Fweb/tags", me)
    assert status == 200
    [tag] = tags
    assert (tag["tag"], tag["digest"], tag["size"]) == ("v1", image.manifest_digest, image.size)
    assert tag["platforms"] == ["linux/amd64"] and tag["created"] == "2024-05-01T10:00:00Z"
    assert tag["pushed_by"] == "root" and tag["pushed_at"] > 0  # from the push history
    status, one = api(appliance, "GET", "/api/v1/repositories/team%2Fapp%2Fweb/tags/v1", me)
    assert status == 200 and one == tag
    # the service read the manifest and its config to list it: that is no client's pull
    time.sleep(1.5)  # what the registry reports of those reads has arrived by now
    status, again = api(appliance, "GET", "/api/v1/repositories/team%2Fapp%2Fweb/tags/v1", me)
    assert again["last_pulled"] is None
    root.inspect("team/app/web", "v1")  # a client's pull
    for _ in range(100):  # the registry's event arrives a moment later
        status, one = api(appliance, "GET", "/api/v1/repositories/team%2Fapp%2Fweb/tags/v1", me)
        if one["last_pulled"]:
            break
        time.sleep(0.1)
    assert one["last_pulled"] >= tag["pushed_at"]
    status, document = api(appliance, "GET", "/api/v1/openapi.json")
    assert status == 200
    validate(document)
    status, error = api(appliance, "GET", "/api/v1/projects")
    assert status == 401 and error["error"] == "unauthorized"


def test_a_maintainer_deletes_a_tag_a_reporter_gets_403(appliance, tmp_path):
    root = appliance.skopeo(tmp_path / "root")
    image = build_image(tmp_path / "image", tag="v1")
    root.push(image, "team/app/gone", "v1")
    path = "/api/v1/repositories/team%2Fapp%2Fgone/tags/v1"
    status, error = api(appliance, "DELETE", path, ("rep", PASSWORDS["rep"]))
    assert status == 403
    assert error["message"] == (
        "You may not delete team/app/gone: role reporter in project team/app allows only pull."
    )
    assert exists(root, "team/app/gone", "v1")
    status, done = api(appliance, "DELETE", path, ("maint", PASSWORDS["maint"]))
    assert status == 200, done
    assert done["deleted"] == [
        f"team/app/gone:v1 removed; manifest {image.manifest_digest[:19]} deleted"
    ]
    assert not exists(root, "team/app/gone", "v1")
    status, _ = api(appliance, "GET", path, ("maint", PASSWORDS["maint"]))
    assert status == 404


def test_a_personal_access_token_works_with_the_api_scope_only(appliance, tmp_path):
    root = appliance.skopeo(tmp_path / "root")
    image = build_image(tmp_path / "image", tag="v1")
    root.push(image, "team/app/tokens", "v1")
    me = ("maint", PASSWORDS["maint"])
    status, with_api = api(
        appliance, "POST", "/api/v1/user/tokens", me, {"name": "ci", "scopes": ["api"]}
    )
    assert status == 201 and with_api["secret"].startswith("apat_")
    status, without = api(
        appliance,
        "POST",
        "/api/v1/user/tokens",
        me,
        {"name": "pull only", "scopes": ["read_registry"]},
    )
    assert status == 201
    tags = "/api/v1/repositories/team%2Fapp%2Ftokens/tags"
    status, listed = api(appliance, "GET", tags, ("maint", with_api["secret"]))
    assert status == 200 and [t["tag"] for t in listed] == ["v1"]
    status, error = api(appliance, "GET", tags, ("maint", without["secret"]))
    assert status == 403 and "no 'api' scope" in error["message"]
    # the read_registry token still pulls: the api scope is about the API only
    puller = appliance.skopeo(tmp_path / "pat", username="maint", password=without["secret"])
    assert puller.list_tags("team/app/tokens") == ["v1"]
    status, _ = api(appliance, "DELETE", f"/api/v1/user/tokens/{with_api['id']}", me)
    assert status == 204
    status, _ = api(appliance, "GET", tags, ("maint", with_api["secret"]))
    assert status == 401


def test_an_index_a_shared_digest_and_a_repository_delete(appliance, tmp_path):
    """What the registry's API cannot do alone is refused with a sentence (409), nothing
    deleted: Distribution 2.8 deletes a manifest with every tag on it."""
    root = appliance.skopeo(tmp_path / "root")
    index = build_index(tmp_path / "multi", tag="multi")
    image = build_image(tmp_path / "image", tag="v1")
    root.push_all(index, "team/app/more", "multi")
    root.push(image, "team/app/more", "v1")
    root.push(image, "team/app/more", "latest")
    me = ("maint", PASSWORDS["maint"])
    status, tags = api(appliance, "GET", "/api/v1/repositories/team%2Fapp%2Fmore/tags", me)
    assert status == 200
    rows = {t["tag"]: t for t in tags}
    assert rows["multi"]["platforms"] == ["linux/amd64", "linux/arm64"]
    assert rows["multi"]["size"] == index.size and rows["multi"]["digest"] == index.index_digest
    assert rows["multi"]["manifests"] == [
        {"platform": platform, "digest": child.manifest_digest, "size": child.size}
        for platform, child in index.children.items()
    ]
    assert rows["v1"]["manifests"] == []
    status, error = api(appliance, "DELETE", "/api/v1/repositories/team%2Fapp%2Fmore/tags/v1", me)
    assert status == 409
    assert error["message"] == (
        "team/app/more:v1: its manifest stays (still tagged latest) and the registry can only "
        "delete a manifest with all its tags; remove the tag on the host with appliance-ctl "
        "tag delete team/app/more:v1. Nothing was deleted."
    )
    assert exists(root, "team/app/more", "v1") and exists(root, "team/app/more", "latest")
    status, error = api(
        appliance, "DELETE", "/api/v1/repositories/team%2Fapp%2Fmore", ("rep", PASSWORDS["rep"])
    )
    assert status == 403
    status, done = api(appliance, "DELETE", "/api/v1/repositories/team%2Fapp%2Fmore", me)
    assert status == 200 and done["deleted"][0].startswith(
        "Deleted repository team/app/more (3 tags"
    )
    for tag in ("multi", "v1", "latest"):
        assert not exists(root, "team/app/more", tag)
    status, repositories = api(appliance, "GET", "/api/v1/projects/team%2Fapp/repositories", me)
    assert "team/app/more" not in {r["name"] for r in repositories}


def test_an_immutable_tag_is_not_deleted_through_the_api_either(appliance, tmp_path):
    """The API deletes past nginx's tag gate (on the registry's own address): the gate's
    verdict is asked all the same, and a maintainer gets its sentence."""
    root = appliance.skopeo(tmp_path / "root")
    image = build_image(tmp_path / "image", tag="v1")
    appliance.ctl("project", "create", "team/rules")
    appliance.ctl("member", "add", "team/rules", "maint", "maintainer")
    appliance.ctl("project", "update", "team/rules", "--immutable-tags", "^v")
    root.push(image, "team/rules/app", "v1")
    status, error = api(
        appliance,
        "DELETE",
        "/api/v1/repositories/team%2Frules%2Fapp/tags/v1",
        ("maint", PASSWORDS["maint"]),
    )
    assert status == 403, error
    assert error["message"].startswith("Tag v1 is immutable in team/rules/app (rule '^v')")
    assert exists(root, "team/rules/app", "v1")
