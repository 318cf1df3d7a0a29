"""The storage migration's pure parts: the plan of what to copy, appliance.yml's section
replaced with the rest of the admin's text kept, the new section checked; and the copy
between two filesystem storages in temporary directories (the s3 side is the
integration test's, on a real moto server)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import yaml

from appliance import settings as settings_module
from appliance import storage_migration as migration
from appliance.errors import ConfigError
from appliance.registry_storage import V2, FilesystemStorage, StorageError

A = "a" * 64
B = "b" * 64


def blob(hex_digest: str) -> str:
    return f"{V2}/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"


TAG = f"{V2}/repositories/team/app/_manifests/tags/v1/current/link"
UPLOAD = f"{V2}/repositories/team/app/_uploads/1234/data"


# ---------------------------------------------------------------- the plan


def test_an_empty_target_gets_every_blob_and_file_but_no_upload():
    step = migration.plan({blob(A): 10, blob(B): 20, TAG: 71, UPLOAD: 5}, {})
    assert step.blobs == {blob(A): 10, blob(B): 20}
    assert step.files == {TAG: 71}
    assert (step.present, step.extra, step.bytes) == ({}, [], 101)
    assert step.describe() == "copy 2 blobs (30 B) and 1 repository files"


def test_a_blob_of_the_same_size_is_verified_not_copied_and_a_different_one_is_copied():
    step = migration.plan({blob(A): 10, blob(B): 20}, {blob(A): 10, blob(B): 19})
    assert step.present == {blob(A): 10}
    assert step.blobs == {blob(B): 20}


def test_files_the_source_lacks_are_removed_and_uploads_left_alone():
    other = f"{V2}/repositories/other/_manifests/tags/v1/current/link"
    step = migration.plan({TAG: 71}, {TAG: 71, other: 71, UPLOAD: 5})
    assert step.extra == [other]
    assert step.files == {TAG: 71}  # a link may change without changing size
    assert "remove 1 files the source does not have" in step.describe()


def test_a_second_pass_skips_the_files_whose_stamp_did_not_change():
    other = f"{V2}/repositories/team/app/_manifests/tags/v2/current/link"
    source = {blob(A): 10, TAG: 71, other: 71}
    before = {blob(A): "1:100", TAG: "2:100", other: "3:100"}
    now = {blob(A): "1:100", TAG: "2:100", other: "3:250"}  # v2 moved to another digest
    same = migration.unchanged(before, now)
    assert same == {blob(A), TAG}
    step = migration.plan(source, source, same)
    assert step.files == {other: 71} and step.blobs == {}
    assert migration.plan(source, {blob(A): 10}, same).files == {TAG: 71, other: 71}


def test_a_file_written_within_the_clock_tick_is_never_taken_for_unchanged(tmp_path):
    storage = FilesystemStorage(tmp_path)
    fill(tmp_path, {TAG: b"sha256:" + A.encode()})
    first = migration.stamped_listing(storage)[1]
    assert migration.unchanged(first, migration.stamped_listing(storage)[1]) == frozenset()
    old = time.time() - 60
    os.utime(tmp_path / TAG, (old, old))
    aged = migration.stamped_listing(storage)[1]
    assert migration.unchanged(aged, migration.stamped_listing(storage)[1]) == {TAG}


def test_what_a_non_empty_target_holds_is_summed_up_with_its_repositories():
    files = {blob(A): 2048, TAG: 71, f"{V2}/repositories/b/_layers/sha256/{A}/link": 71}
    assert migration.summary_of(files) == "3 files, 2.1 KiB, repositories b, team/app"


# ---------------------------------------------------------------- appliance.yml

S3 = {"s3": {"bucket": "images", "region": "us-east-1"}, "redirect": {"disable": True}}

ADMIN = """\
# The registry host of team X.
external_url: https://registry.example.com   # the public name

registry:
  # where the images live
  storage:
    filesystem:
      rootdirectory: /srv/images   # the big disk
  storage_delete_enabled: true

# nginx below
nginx:
  http_port: 8080
"""


def test_the_storage_section_is_replaced_in_place_and_every_comment_kept():
    text, kept = migration.with_storage(ADMIN, S3)
    assert kept
    assert text == ADMIN.replace(
        "  storage:\n    filesystem:\n      rootdirectory: /srv/images   # the big disk\n",
        "  storage:\n    s3:\n      bucket: images\n      region: us-east-1\n"
        "    redirect:\n      disable: true\n",
    )


def test_a_registry_section_without_storage_gets_one_at_its_indentation():
    text, kept = migration.with_storage("registry:\n    log_level: info\n# end\n", S3)
    assert kept
    assert yaml.safe_load(text) == {"registry": {"log_level": "info", "storage": S3}}
    assert text.startswith("registry:\n    log_level: info\n    storage:\n      s3:\n")
    assert text.endswith("# end\n")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "root: /srv\n"])
def test_a_file_without_a_registry_section_gets_one_at_the_end(text):
    new, kept = migration.with_storage(text, S3)
    assert kept and new.startswith(text)
    assert (yaml.safe_load(new) or {})["registry"] == {"storage": S3}


@pytest.mark.parametrize(
    "text",
    [
        "registry: {storage: {filesystem: {rootdirectory: /srv}}, log_level: info}\n",
        "{registry: {log_level: info}}\n",
        "registry:\n",
    ],
)
def test_a_shape_that_cannot_be_spliced_is_written_again_whole_with_the_same_values(text):
    new, kept = migration.with_storage(text, S3)
    assert not kept
    expected = yaml.safe_load(text)
    expected["registry"] = {**(expected["registry"] or {}), "storage": S3}
    assert yaml.safe_load(new) == expected


def test_the_config_is_written_with_its_mode_and_checked_first(tmp_path):
    path = tmp_path / "appliance.yml"
    path.write_text(ADMIN)
    path.chmod(0o640)
    assert migration.write_config(path, S3) is True
    assert path.stat().st_mode & 0o777 == 0o640
    assert settings_module.load(path).registry.storage == S3
    assert "# the public name" in path.read_text()
    with pytest.raises(ConfigError):
        migration.write_config(path, {"s3": {"region": "us-east-1"}})  # no bucket
    assert settings_module.load(path).registry.storage == S3  # left as it was
    assert not [p for p in tmp_path.iterdir() if p.name != "appliance.yml"]


# ---------------------------------------------------------------- the new section


def settings_at(tmp_path: Path) -> settings_module.Settings:
    path = tmp_path / "appliance.yml"
    path.write_text(f"root: {tmp_path}\n")
    return settings_module.load(path)


@pytest.mark.parametrize("wrapped", [S3, {"storage": S3}, {"registry": {"storage": S3}}])
def test_the_section_may_be_given_bare_or_cut_from_an_appliance_yml(tmp_path, wrapped):
    target = tmp_path / "target.yml"
    target.write_text(yaml.safe_dump(wrapped))
    section, new = migration.new_settings(settings_at(tmp_path), target)
    assert section == S3 and new.registry.storage == S3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "holds no storage section; write the new registry.storage there"),
        ("s3: {region: x}\n", "registry.storage.s3.bucket: required by the s3 driver; correct"),
        ("s4: {}\n", "registry.storage.s4: unknown storage driver; drivers: filesystem, s3"),
        ("azure: {accountname: a, accountkey: k, container: c}\n", "not azure; copy with"),
    ],
)
def test_a_bad_section_is_one_sentence_naming_the_file(tmp_path, content, expected):
    target = tmp_path / "target.yml"
    target.write_text(content)
    with pytest.raises(ConfigError) as caught:
        migration.new_settings(settings_at(tmp_path), target)
    assert str(caught.value).startswith(f"{target}: ")
    assert expected in str(caught.value)


# ---------------------------------------------------------------- the copy


def fill(root: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def blob_of(data: bytes) -> tuple[str, bytes]:
    return blob(hashlib.sha256(data).hexdigest()), data


def test_a_copy_then_a_second_pass_copies_only_what_changed(tmp_path):
    source, target = FilesystemStorage(tmp_path / "old"), FilesystemStorage(tmp_path / "new")
    one, two = blob_of(b"layer one"), blob_of(b"layer two")
    fill(source.root, {one[0]: one[1], TAG: b"sha256:" + A.encode(), UPLOAD: b"partial"})
    copy = migration.Copy(source, target)
    copy.apply(copy.first_step())
    assert target.read(one[0]) == one[1] and target.read(TAG).endswith(A.encode())
    assert not (target.root / UPLOAD).exists()
    assert (copy.blobs_copied, copy.blobs_verified) == (1, 1)

    fill(source.root, {two[0]: two[1], TAG: b"sha256:" + B.encode()})  # a push, a new tag
    before = {p: p.read_bytes() for p in source.root.rglob("*") if p.is_file()}
    step = copy.next_step()
    assert list(step.blobs) == [two[0]] and step.present == {}
    copy.apply(step)
    assert target.read(TAG).endswith(B.encode()) and target.read(two[0]) == two[1]
    assert (copy.blobs_copied, copy.blobs_verified) == (2, 2)
    assert {p: p.read_bytes() for p in source.root.rglob("*") if p.is_file()} == before
    (source.root / TAG).unlink()  # a tag deleted before the window
    step = copy.next_step()
    assert step.extra == [TAG]
    copy.apply(step)
    assert not (target.root / TAG).exists()


def test_a_blob_whose_content_does_not_match_its_name_is_refused(tmp_path):
    source, target = FilesystemStorage(tmp_path / "old"), FilesystemStorage(tmp_path / "new")
    fill(source.root, {blob(A): b"not the content of digest aaaa"})
    copy = migration.Copy(source, target)
    with pytest.raises(StorageError, match="do not match their digest even after a second copy"):
        copy.apply(copy.first_step())


def test_a_blob_already_on_the_target_but_corrupt_is_copied_again(tmp_path):
    source, target = FilesystemStorage(tmp_path / "old"), FilesystemStorage(tmp_path / "new")
    good = blob_of(b"the layer")
    fill(source.root, {good[0]: good[1]})
    fill(target.root, {good[0]: b"the l@yer"})  # same size, other bytes
    copy = migration.Copy(source, target)
    step = copy.first_step()
    assert step.present == {good[0]: len(good[1])}
    copy.apply(step)
    assert target.read(good[0]) == good[1]


def test_the_same_directory_or_bucket_under_other_settings_is_the_same_place(tmp_path):
    from appliance.registry_storage import S3Storage

    assert migration.same_place(
        FilesystemStorage(tmp_path / "data"), FilesystemStorage(tmp_path / "x/../data")
    )
    assert not migration.same_place(
        FilesystemStorage(tmp_path / "data"), FilesystemStorage(tmp_path / "new")
    )
    s3 = {"bucket": "images", "region": "us-east-1", "regionendpoint": "http://127.0.0.1:9"}
    keys = {"accesskey": "other", "secretkey": "other secret"}
    assert migration.same_place(S3Storage(s3), S3Storage({**s3, **keys}))
    with pytest.raises(StorageError, match="accesskey and secretkey go together"):
        S3Storage({**s3, "accesskey": "only the access key"})
    assert not migration.same_place(S3Storage(s3), S3Storage({**s3, "rootdirectory": "/r"}))
    assert not migration.same_place(S3Storage(s3), FilesystemStorage(tmp_path))
