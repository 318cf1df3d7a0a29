"""Content management on a running appliance: `repo list|delete`, `tag list|delete`,
`project delete [--with-images]`, checked the way a user checks them (skopeo pulls,
the catalog and tags/list through nginx), plus who may delete through the registry.

One appliance serves the module (starting one is the slow part); each test pushes to
repositories of its own, so the tests stay independent. The last test moves the
registry to s3 (a real moto server) for a tag and a repository delete there, and puts
the filesystem back.
"""

from __future__ import annotations

import copy
import json
import re
import ssl
import urllib.error
import urllib.request

import pytest

from tests.support.appliance import ApplianceUnderTest
from tests.support.oci import build_image, build_index
from tests.support.s3 import s3_client
from tests.support.skopeo import Skopeo, SkopeoError

PASSWORDS = {
    "rep": "reporter password 1",
    "dev": "developer password 1",
    "maint": "maintainer password 1",
}


@pytest.fixture(scope="module")
def appliance():
    # The guide's blob descriptor cache: what a deleted repository leaves in it must not
    # outlive the repository (test_repo_delete_... below).
    appliance = ApplianceUnderTest.create(
        {
            "registry": {
                "storage_delete_enabled": True,
                "storage": {"cache": {"blobdescriptor": "inmemory"}},
            }
        },
        prefix="appliance-content-",
    )
    try:
        appliance.reconfigure()
        appliance.wait_listening()
        appliance.ctl("project", "create", "team/app")
        for name, password in PASSWORDS.items():
            appliance.ctl("user", "create", name, "--password-stdin", input=password + "\n")
        for name, role in (("rep", "reporter"), ("dev", "developer"), ("maint", "maintainer")):
            appliance.ctl("member", "add", "team/app", name, role)
        yield appliance
    finally:
        appliance.destroy()


@pytest.fixture(scope="module")
def root(appliance, tmp_path_factory) -> Skopeo:
    return appliance.skopeo(tmp_path_factory.mktemp("root-client"))


def ctl_json(appliance: ApplianceUnderTest, *args: str) -> list[dict]:
    return json.loads(appliance.ctl(*args, "--json").stdout)


def registry_get(appliance: ApplianceUnderTest, path: str, scope: str) -> tuple[int, dict]:
    """(status, JSON body) of a GET through nginx with root's token for `scope`."""
    request = urllib.request.Request(
        f"https://{appliance.registry_address}{path}",
        headers={"Authorization": f"Bearer {appliance.token(scope)}"},
    )
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def catalog(appliance: ApplianceUnderTest) -> list[str]:
    status, body = registry_get(appliance, "/v2/_catalog?n=1000", "registry:catalog:*")
    assert status == 200, body
    return body["repositories"]


def tags_list_status(appliance: ApplianceUnderTest, repository: str) -> int:
    return registry_get(appliance, f"/v2/{repository}/tags/list", f"repository:{repository}:pull")[
        0
    ]


def manifest_exists(client: Skopeo, repository: str, reference: str) -> bool:
    """`reference` is a tag or a digest (the digest form reaches an untagged manifest)."""
    separator = "@" if reference.startswith("sha256:") else ":"
    try:
        client.run(
            "inspect",
            "--raw",
            *client._tls(""),
            *client._creds(""),
            f"docker://{client.registry}/{repository}{separator}{reference}",
        )
    except SkopeoError as error:
        assert "manifest unknown" in error.stderr, error.stderr
        return False
    return True


# ---------------------------------------------------------------- listings


def test_tag_list_reports_digest_platforms_size_and_creation_as_pushed(appliance, root, tmp_path):
    image = build_image(tmp_path / "one", tag="v1", created="2024-05-01T10:00:00.123456789Z")
    index = build_index(
        tmp_path / "multi",
        tag="multi",
        created=("2024-06-01T08:00:00Z", "2024-06-02T09:30:00+02:00"),
    )
    root.push(image, "team/app/list", "v1")
    root.push(image, "team/app/list", "latest")
    root.push_all(index, "team/app/list", "multi")
    rows = {row["tag"]: row for row in ctl_json(appliance, "tag", "list", "team/app/list")}
    for row in rows.values():  # the history's columns: tests/appliance/test_retention.py
        for key in ("pushed_at", "pushed_by", "last_pulled"):
            row.pop(key)  # present in every row (KeyError otherwise)
    assert rows["v1"] == {
        "tag": "v1",
        "digest": image.manifest_digest,
        "media_type": "application/vnd.oci.image.manifest.v1+json",
        "platforms": ["linux/amd64"],
        "size": image.size,  # manifest + config + layer, as pushed
        "created": "2024-05-01T10:00:00Z",
        "manifests": [],  # an image, not an index
    }
    assert rows["latest"]["digest"] == image.manifest_digest
    assert rows["multi"] == {
        "tag": "multi",
        "digest": index.index_digest,
        "media_type": "application/vnd.oci.image.index.v1+json",
        "platforms": ["linux/amd64", "linux/arm64"],
        "size": index.size,  # the index, both platform manifests and their blobs
        "created": "2024-06-02T07:30:00Z",  # the newest platform's, in UTC
        "manifests": [
            {"platform": platform, "digest": child.manifest_digest, "size": child.size}
            for platform, child in index.children.items()
        ],
    }
    assert root.digest("team/app/list", "multi") == index.index_digest
    table = appliance.ctl("tag", "list", "team/app/list").stdout.splitlines()
    assert re.split(r"\s\s+", table[0]) == [
        *("TAG", "DIGEST", "PLATFORMS", "SIZE", "CREATED"),
        *("PUSHED", "PUSHED BY", "LAST PULLED"),
    ]
    assert table[2].split()[:3] == ["multi", index.index_digest[:19], "linux/amd64,linux/arm64"]
    assert "  2024-05-01 10:00:00 UTC  " in table[3]
    unknown = appliance.ctl("tag", "list", "team/app/unknown", check=False)
    assert (unknown.returncode, unknown.stderr) == (
        2,
        "appliance-ctl: There is no repository team/app/unknown in the registry.\n",
    )


def test_repo_list_names_projects_counts_tags_and_sizes_shared_layers_once(
    appliance, root, tmp_path
):
    base = build_image(tmp_path / "base", tag="v1", files={"base.txt": b"shared" * 4000})
    other = build_image(tmp_path / "other", tag="v2")
    root.push(base, "team/app/sizes", "v1")
    root.push(base, "team/app/sizes", "again")  # same digest: its blobs count once
    root.push(other, "team/app/sizes", "v2")
    root.push(base, "root/personal", "v1")
    rows = {row["name"]: row for row in ctl_json(appliance, "repo", "list", "--sizes")}
    assert rows["team/app/sizes"] == {
        "name": "team/app/sizes",
        "project": "team/app",
        "tags": 3,
        "size": base.size + other.size,
    }
    assert rows["root/personal"]["project"] == "root (personal)"
    under = ctl_json(appliance, "repo", "list", "team/app")
    assert "root/personal" not in {row["name"] for row in under}
    assert "team/app/sizes" in {row["name"] for row in under}
    assert "size" not in under[0]  # sizes only when asked: they read every manifest
    table = appliance.ctl("repo", "list", "team/app", "--sizes").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "PROJECT", "TAGS", "SIZE"]
    refused = appliance.ctl("repo", "list", "no/such", check=False)
    assert refused.returncode == 2
    assert "There is no project no/such and no repository under it." in refused.stderr


# ---------------------------------------------------------------- tag delete


def test_tag_delete_keeps_the_other_tag_on_the_same_digest_pullable(appliance, root, tmp_path):
    image = build_image(tmp_path / "image", tag="v1")
    root.push(image, "team/app/keep", "v1")
    root.push(image, "team/app/keep", "latest")
    result = appliance.ctl("tag", "delete", "team/app/keep:v1")
    assert result.stdout.splitlines() == [
        f"team/app/keep:v1 removed; {image.manifest_digest[:19]} kept: still tagged latest"
    ]
    assert root.list_tags("team/app/keep") == ["latest"]
    assert not manifest_exists(root, "team/app/keep", "v1")
    pulled = root.pull("team/app/keep", "latest", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest


def test_tag_delete_of_the_last_tags_deletes_the_manifest_and_an_index_with_its_platforms(
    appliance, root, tmp_path
):
    image = build_image(tmp_path / "image", tag="v2")
    index = build_index(tmp_path / "multi", tag="multi")
    root.push(image, "team/app/gone", "v2")
    root.push(image, "team/app/gone", "v2-alias")
    root.push_all(index, "team/app/gone", "multi")
    kept = build_image(tmp_path / "kept", tag="kept")
    root.push(kept, "team/app/gone", "kept")
    result = appliance.ctl("tag", "delete", "team/app/gone:v2", "team/app/gone:v2-alias")
    short = image.manifest_digest[:19]
    assert result.stdout.splitlines() == [
        f"team/app/gone:v2 removed; manifest {short} deleted",
        f"team/app/gone:v2-alias removed; manifest {short} deleted",
        "Their blobs stay on disk until the next garbage collection "
        "(appliance-ctl registry-garbage-collect).",
    ]
    assert not manifest_exists(root, "team/app/gone", image.manifest_digest)
    result = appliance.ctl("tag", "delete", "team/app/gone:multi")
    assert f"index {index.index_digest[:19]} deleted with 2 platform manifests" in result.stdout
    for child in (index.index_digest, *(c.manifest_digest for c in index.children.values())):
        assert not manifest_exists(root, "team/app/gone", child)
    assert root.list_tags("team/app/gone") == ["kept"]
    assert root.pull("team/app/gone", "kept", tmp_path / "pulled").manifest_digest == (
        kept.manifest_digest
    )


@pytest.mark.parametrize(
    ("arguments", "sentence"),
    [
        (["team/app/bad"], "'team/app/bad' names no tag; give REPOSITORY:TAG, like team/app:v1."),
        (
            ["team/app/bad:v1", "team/app/bad:nope", "team/app/none:v1"],
            "There is no tag team/app/bad:nope and no repository team/app/none in the "
            "registry; nothing was deleted.",
        ),
        (["team/app/bad:v1", "Team/App:v1"], "'Team/App' is not a repository name"),
    ],
)
def test_bad_tag_delete_arguments_get_a_sentence_and_delete_nothing(
    appliance, root, tmp_path, arguments, sentence
):
    image = build_image(tmp_path / "image", tag="v1")
    root.push(image, "team/app/bad", "v1")
    result = appliance.ctl("tag", "delete", *arguments, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"appliance-ctl: {sentence}"), result.stderr
    assert "Traceback" not in result.stderr
    assert root.list_tags("team/app/bad") == ["v1"]
    assert manifest_exists(root, "team/app/bad", "v1")


def test_a_delete_waits_for_no_garbage_collection_it_is_refused_while_one_holds_the_lock(
    appliance, root, tmp_path
):
    from appliance.registry_storage import storage_lock

    image = build_image(tmp_path / "image", tag="v1")
    root.push(image, "team/app/locked", "v1")
    lock = appliance.root / "var/opt/appliance/registry-storage.lock"
    with storage_lock(lock, "garbage collection"):
        result = appliance.ctl("tag", "delete", "team/app/locked:v1", check=False)
    assert result.returncode == 1
    assert "the registry's storage is busy (garbage collection, pid" in result.stderr
    assert root.list_tags("team/app/locked") == ["v1"]


# ---------------------------------------------------------------- repo delete


def test_repo_delete_takes_the_repository_out_of_the_catalog_and_a_new_push_of_it_works(
    appliance, root, tmp_path
):
    image = build_image(tmp_path / "image", tag="v1")
    index = build_index(tmp_path / "multi", tag="multi")
    root.push(image, "team/app/doomed", "v1")
    root.push_all(index, "team/app/doomed", "multi")
    root.push(image, "team/app/doomed/nested", "v1")
    refused = appliance.ctl("repo", "delete", "team/app/doomed", check=False)
    assert refused.returncode == 2 and "add --yes" in refused.stderr
    assert "team/app/doomed" in catalog(appliance)

    result = appliance.ctl("repo", "delete", "team/app/doomed", "--yes")
    assert "Deleted repository team/app/doomed (2 tags, 4 manifests)." in result.stdout
    assert "team/app/doomed" not in catalog(appliance)
    assert tags_list_status(appliance, "team/app/doomed") == 404
    assert root.list_tags("team/app/doomed/nested") == ["v1"]  # a repository under it stays
    again = appliance.ctl("repo", "delete", "team/app/doomed", "--yes", check=False)
    assert again.returncode == 2
    assert "There is no repository team/app/doomed in the registry" in again.stderr

    # The registry forgot the blobs the repository linked (their links were deleted
    # through its API, which clears its cache): the same image pushed again is uploaded
    # again, and still pulls after the registry is handed over to a fresh process.
    root.push(image, "team/app/doomed", "v1")
    appliance.ctl("restart", "registry")
    appliance.wait_listening()
    pulled = root.pull("team/app/doomed", "v1", tmp_path / "pulled")
    assert pulled.layer_digests == image.layer_digests


# ---------------------------------------------------------------- project delete


def test_project_delete_refuses_while_it_has_images_and_with_images_deletes_them(
    appliance, root, tmp_path
):
    appliance.ctl("project", "create", "ops/tools")
    image = build_image(tmp_path / "image", tag="v1")
    root.push(image, "ops/tools", "v1")
    root.push(image, "ops/tools/cli", "v1")
    refused = appliance.ctl("project", "delete", "ops/tools", check=False)
    assert refused.returncode == 1
    assert refused.stderr == (
        "appliance-ctl: Project ops/tools still holds 2 repositories (ops/tools, "
        "ops/tools/cli); delete them with the project (appliance-ctl project delete "
        "ops/tools --with-images) or first (appliance-ctl repo delete). Nothing was deleted.\n"
    )
    assert {"ops/tools", "ops/tools/cli"} <= set(catalog(appliance))

    result = appliance.ctl("project", "delete", "ops/tools", "--with-images", "--yes")
    assert result.stdout.splitlines() == [
        "Deleted repository ops/tools (1 tag, 1 manifest).",
        "Deleted repository ops/tools/cli (1 tag, 1 manifest).",
        "Deleted project ops/tools.",
        "Their blobs stay on disk until the next garbage collection "
        "(appliance-ctl registry-garbage-collect).",
    ]
    assert not {"ops/tools", "ops/tools/cli"} & set(catalog(appliance))
    assert "ops/tools" not in appliance.ctl("project", "list").stdout

    appliance.ctl("project", "create", "ops/empty")  # nothing pushed: deleted as before
    assert appliance.ctl("project", "delete", "ops/empty").stdout == "Deleted project ops/empty.\n"


# ---------------------------------------------------------------- registry clients


def test_only_maintainers_and_above_may_delete_through_the_registry(appliance, root, tmp_path):
    image = build_image(tmp_path / "image", tag="v1")
    root.push(image, "team/app/perm", "v1")
    audit_log = appliance.root / "var/log/appliance/audit/audit.log"
    for user, role in (("rep", "reporter"), ("dev", "developer")):
        client = appliance.skopeo(tmp_path / user, user, PASSWORDS[user])
        client.pull("team/app/perm", "v1", tmp_path / f"{user}-pulled")  # may pull
        with pytest.raises(SkopeoError) as refused:
            client.delete("team/app/perm", "v1")
        # the registry answers a token without `delete` with 401, whatever the role
        assert "authentication required" in refused.value.stderr
        assert "(401 Unauthorized)" in refused.value.stderr
        assert root.list_tags("team/app/perm") == ["v1"]
        records = [json.loads(line) for line in audit_log.read_text().splitlines()]
        asked = [
            r
            for r in records
            if r.get("user") == user and any(s.endswith(":*") for s in r.get("requested", []))
        ]
        assert f"role {role} in project team/app allows only" in asked[-1]["reason"]
    maint = appliance.skopeo(tmp_path / "maint", "maint", PASSWORDS["maint"])
    maint.delete("team/app/perm", "v1")
    assert not manifest_exists(root, "team/app/perm", "v1")


# ---------------------------------------------------------------- s3


def test_tag_and_repo_delete_on_s3_storage(appliance, root, s3_server, tmp_path):
    bucket = s3_client(s3_server)
    bucket.create_bucket(Bucket="content")
    storage = {
        "s3": {
            "accesskey": "testing",
            "secretkey": "moto-accepts-any-secret-key",
            "bucket": "content",
            "region": "us-east-1",
            "regionendpoint": s3_server,
            "secure": False,
            "v4auth": True,
            "rootdirectory": "/images",
        },
        "redirect": {"disable": True},
    }
    saved = copy.deepcopy(appliance.config)
    appliance.write_config({"registry": {"storage": storage}})
    try:
        appliance.reconfigure()
        appliance.wait_listening()
        image = build_image(tmp_path / "image", tag="v1")
        other = build_image(tmp_path / "other", tag="v2")
        root.push(image, "team/app/s3", "v1")
        root.push(image, "team/app/s3", "latest")
        root.push(other, "team/app/s3", "v2")
        [row] = ctl_json(appliance, "repo", "list", "team/app/s3", "--sizes")
        assert (row["tags"], row["size"]) == (3, image.size + other.size)

        result = appliance.ctl("tag", "delete", "team/app/s3:v1", "team/app/s3:v2")
        assert result.stdout.splitlines()[:2] == [
            f"team/app/s3:v1 removed; {image.manifest_digest[:19]} kept: still tagged latest",
            f"team/app/s3:v2 removed; manifest {other.manifest_digest[:19]} deleted",
        ]
        assert root.list_tags("team/app/s3") == ["latest"]
        assert root.pull("team/app/s3", "latest", tmp_path / "pulled").manifest_digest == (
            image.manifest_digest
        )

        appliance.ctl("repo", "delete", "team/app/s3", "--yes")
        assert "team/app/s3" not in catalog(appliance)
        assert tags_list_status(appliance, "team/app/s3") == 404
        keys = bucket.list_objects_v2(Bucket="content", Prefix="images/docker/registry/v2/repo")
        assert not [k["Key"] for k in keys.get("Contents", []) if "/team/app/s3/" in k["Key"]]
    finally:
        appliance.config = saved
        appliance.write_config()
        appliance.reconfigure()
        appliance.wait_listening()
