"""Content management's decisions as tables, on a storage laid out as Distribution 2.8
lays it out (tests/appliance/test_content.py runs the commands on a real registry)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pytest

from appliance.auth import cli as auth_cli
from appliance.auth.store import Store
from appliance.errors import UsageError
from appliance.registry_content import (
    RegistryContent,
    owning_project,
    parse_created,
    parse_tag_reference,
    plan_repository_delete,
    plan_tag_delete,
    repository_rows,
)
from appliance.registry_storage import FilesystemStorage, read_content
from tests.support.auth_server import make_config
from tests.unit.test_registry_storage import Layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "storage")


def content_of(layout: Layout):
    return read_content(FilesystemStorage(layout.root))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("team/app:v1", ("team/app", "v1")),
        ("app:1.0-rc_2", ("app", "1.0-rc_2")),
        ("team/sub.group/app-x:latest", ("team/sub.group/app-x", "latest")),
    ],
)
def test_tag_references_that_are_read(text, expected):
    assert parse_tag_reference(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("team/app", "names no tag; give REPOSITORY:TAG"),
        ("team/app:", "names no tag"),
        (":v1", "names no tag"),
        ("team/app@sha256:" + "a" * 64, "names a digest"),
        ("Team/App:v1", "is not a repository name"),
        ("localhost:5050/team/app:v1", "is not a repository name"),
        ("team/../x:v1", "is not a repository name"),
        ("team/app:-v1", "is not a tag"),
        ("team/app:" + "x" * 129, "is not a tag"),
    ],
)
def test_tag_references_that_are_refused_with_a_sentence(text, problem):
    with pytest.raises(UsageError, match=problem):
        parse_tag_reference(text)


def test_a_tag_on_a_digest_another_tag_holds_is_only_unlinked(layout):
    v1 = layout.image("team/app", [b"app"], tag="v1")
    layout.tag("team/app", "latest", v1)
    plan = plan_tag_delete(content_of(layout), [("team/app", "v1")])
    assert plan.deletions == ()
    assert plan.lines() == [f"team/app:v1 removed; {v1[:19]} kept: still tagged latest"]


def test_the_last_tag_of_a_manifest_deletes_it_and_two_tags_on_it_delete_it_once(layout):
    v1 = layout.image("team/app", [b"app"], tag="v1")
    layout.tag("team/app", "latest", v1)
    other = layout.image("team/app", [b"other"], tag="other")
    plan = plan_tag_delete(content_of(layout), [("team/app", "v1"), ("team/app", "latest")])
    assert [(d.digest, d.children) for d in plan.deletions] == [(v1, ())]
    assert [r.tag for r in plan.removals] == ["v1", "latest"]
    assert plan.lines()[1] == f"team/app:latest removed; manifest {v1[:19]} deleted"
    assert other not in {d.digest for d in plan.deletions}


def test_an_index_goes_with_the_platforms_no_other_tag_reaches(layout):
    amd64 = layout.image("team/multi", [b"amd64"])
    arm64 = layout.image("team/multi", [b"arm64"], tag="arm-only")
    index = layout.index("team/multi", {"amd64": amd64, "arm64": arm64}, tag="v1")
    [deletion] = plan_tag_delete(content_of(layout), [("team/multi", "v1")]).deletions
    assert (deletion.digest, deletion.is_index, deletion.children) == (index, True, (amd64,))


def test_an_index_and_its_tagged_platform_deleted_together_each_say_so(layout):
    amd64 = layout.image("team/multi", [b"amd64"], tag="amd64")
    arm64 = layout.image("team/multi", [b"arm64"])
    index = layout.index("team/multi", {"amd64": amd64, "arm64": arm64}, tag="v1")
    plan = plan_tag_delete(content_of(layout), [("team/multi", "v1"), ("team/multi", "amd64")])
    assert [(d.digest, set(d.children)) for d in plan.deletions] == [(index, {amd64, arm64})]
    assert plan.lines() == [
        f"team/multi:v1 removed; index {index[:19]} deleted with 2 platform manifests",
        f"team/multi:amd64 removed; manifest {amd64[:19]} deleted with index {index[:19]}",
    ]


def test_a_platform_of_a_still_tagged_index_is_kept_and_says_so(layout):
    amd64 = layout.image("team/multi", [b"amd64"], tag="amd64")
    arm64 = layout.image("team/multi", [b"arm64"])
    layout.index("team/multi", {"amd64": amd64, "arm64": arm64}, tag="v1")
    plan = plan_tag_delete(content_of(layout), [("team/multi", "amd64")])
    assert plan.deletions == ()
    assert plan.removals[0].kept_because == "a platform of v1"


def test_unknown_repositories_and_tags_are_all_named_before_anything_is_planned(layout):
    layout.image("team/app", [b"app"], tag="v1")
    with pytest.raises(UsageError) as refused:
        plan_tag_delete(
            content_of(layout), [("team/app", "v1"), ("team/app", "v9"), ("team/nope", "x")]
        )
    assert str(refused.value) == (
        "There is no tag team/app:v9 and no repository team/nope in the registry; "
        "nothing was deleted."
    )


def test_a_repository_deletion_lists_indexes_before_their_children_and_every_blob_link(layout):
    amd64 = layout.image("team/multi", [b"amd64"])
    arm64 = layout.image("team/multi", [b"arm64"])
    index = layout.index("team/multi", {"amd64": amd64, "arm64": arm64}, tag="v1")
    content = content_of(layout)
    plan = plan_repository_delete(content, "team/multi")
    assert plan.manifests[0] == index and set(plan.manifests) == {index, amd64, arm64}
    # both layers, and the config (the two platforms' configs are the same bytes here)
    assert set(plan.blobs) == content.repositories["team/multi"].layers and len(plan.blobs) == 3
    with pytest.raises(UsageError, match="There is no repository team/none"):
        plan_repository_delete(content, "team/none")


def test_repository_rows_filter_by_path_component_wise_and_count_a_shared_layer_once(layout):
    base = b"base" * 1000
    v1 = layout.image("team/app", [base, b"v1"], tag="v1")
    layout.image("team/app", [base, b"v2"], tag="v2")
    layout.tag("team/app", "latest", v1)
    layout.image("team/app2", [b"other"], tag="v1")
    layout.image("team/app/web", [b"web"], tag="v1")
    content = content_of(layout)
    rows = repository_rows(content, "team/app", lambda name: "team", sizes=True)
    assert [(r.name, r.tags, r.project) for r in rows] == [
        ("team/app", 3, "team"),
        ("team/app/web", 1, "team"),
    ]
    held = {d for m in content.repositories["team/app"].revisions for d in {m}} | {
        b.digest
        for m in content.repositories["team/app"].revisions
        for b in content.manifests[m].blobs
    }
    assert rows[0].size == sum(content.blobs[d] for d in held)
    assert rows[0].size < 2 * len(base)  # the base layer counts once


def test_owning_project_is_the_longest_project_path():
    projects = ["team", "team/app", "team/app2"]
    assert owning_project("team/app/web", projects) == "team/app"
    assert owning_project("team/other", projects) == "team"
    assert owning_project("team2/x", projects) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-01T10:20:30Z", dt.datetime(2024, 3, 1, 10, 20, 30, tzinfo=dt.UTC)),
        ("2024-03-01T10:20:30.123456789Z", dt.datetime(2024, 3, 1, 10, 20, 30, 123456, dt.UTC)),
        ("2024-03-01T12:20:30+02:00", dt.datetime(2024, 3, 1, 10, 20, 30, tzinfo=dt.UTC)),
        ("yesterday", None),
        (None, None),
        (1709288430, None),
    ],
)
def test_created_dates_as_build_tools_write_them(value, expected):
    assert parse_created(value) == expected


def test_project_delete_refuses_a_project_with_repositories_and_deletes_nothing(
    layout, tmp_path, capsys
):
    """The refusal needs no registry: the storage says what the project holds."""
    config = make_config(tmp_path / "auth")
    store = Store(config.database)
    store.create_project("team/app", "private", True)
    store.create_project("team/app/web", "private", True)
    layout.image("team/app", [b"app"], tag="v1")
    layout.image("team/app/api", [b"api"], tag="v1")
    layout.image("team/app/web", [b"web"], tag="v1")
    layout.image("team/app/web/x", [b"x"], tag="v1")

    def api():  # the refusal must not get as far as the registry
        raise AssertionError("the registry was asked")

    def content(context):
        return RegistryContent(FilesystemStorage(layout.root), api, tmp_path / "lock")

    parser = argparse.ArgumentParser()
    auth_cli.register(parser.add_subparsers(dest="command"), registry_content=content)
    context = argparse.Namespace(auth_database=config.database, default_registry_enabled=True)
    args = parser.parse_args(["project", "delete", "team/app"])
    with pytest.raises(auth_cli.UsageProblem) as refused:
        args.handler(args, context)
    # team/app/web's repositories belong to the deeper project team/app/web.
    assert str(refused.value) == (
        "Project team/app still holds 2 repositories (team/app, team/app/api); delete them "
        "with the project (appliance-ctl project delete team/app --with-images) or first "
        "(appliance-ctl repo delete). Nothing was deleted."
    )
    assert store.find_project("team/app") is not None
    args = parser.parse_args(["project", "delete", "team/app/web"])
    with pytest.raises(auth_cli.UsageProblem, match=r"holds 2 repositories \(team/app/web, "):
        args.handler(args, context)
    # --with-images without a terminal and without --yes asks nobody and deletes nothing.
    args = parser.parse_args(["project", "delete", "team/app", "--with-images"])
    with pytest.raises(UsageError, match="add --yes"):
        args.handler(args, context)
    assert store.find_project("team/app") is not None
    assert len(content_of(layout).repositories) == 4


def test_with_deletes_off_nothing_is_removed_not_even_a_tag_the_registry_would_not_see(
    layout, tmp_path
):
    """The registry would refuse the manifest deletes (405) but not the tag unlinked in
    storage: both commands refuse before touching anything."""
    v1 = layout.image("team/app", [b"app"], tag="v1")
    layout.tag("team/app", "latest", v1)

    def api():
        raise AssertionError("the registry was asked")

    content = RegistryContent(FilesystemStorage(layout.root), api, tmp_path / "lock", False)
    with pytest.raises(UsageError, match="Deletes are disabled in the registry"):
        content.delete_tags([("team/app", "v1")])
    with pytest.raises(UsageError, match="Deletes are disabled in the registry"):
        content.delete_repositories(["team/app"], print)
    assert content_of(layout).repositories["team/app"].tags == {"v1": v1, "latest": v1}


def test_a_snapshot_of_some_repositories_walks_their_subtrees_nested_ones_included(layout):
    v1 = layout.image("team/app", [b"app"], tag="v1")
    web = layout.image("team/app/web", [b"web"], tag="v1")
    layout.image("team/app2", [b"other"], tag="v1")
    content = read_content(FilesystemStorage(layout.root), ["team/app", "team/app/web"])
    assert {name: r.tags for name, r in content.repositories.items()} == {
        "team/app": {"v1": v1},
        "team/app/web": {"v1": web},
    }
    assert set(read_content(FilesystemStorage(layout.root), ["team/nope"]).repositories) == set()


class Terminal:
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "confirmed"), [("y", True), ("YES ", True), ("", False)])
def test_a_delete_asks_on_a_terminal_and_goes_ahead_only_on_yes(monkeypatch, answer, confirmed):
    monkeypatch.setattr("sys.stdin", Terminal())
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or answer)
    if confirmed:
        auth_cli.confirm("Delete repository team/app?", assume_yes=False)
    else:
        with pytest.raises(UsageError, match="Not confirmed; nothing was deleted."):
            auth_cli.confirm("Delete repository team/app?", assume_yes=False)
    assert asked == ["Delete repository team/app? [y/N] "]


def test_retention_deletes_a_tag_only_if_it_still_points_where_the_plan_saw_it(layout, tmp_path):
    """A tag pushed again between a retention run's plan and its delete (CI re-using a
    name) is skipped, and so is one deleted meanwhile: never the fresh image."""
    old = layout.image("team/app", [b"old"], tag="ci-1")
    moved = layout.image("team/app", [b"moved"], tag="ci-2")
    fresh = layout.image("team/app", [b"fresh"], tag="fresh")
    layout.tag("team/app", "ci-2", fresh)  # pushed again after the plan saw `moved`
    deleted: list[str] = []

    class Registry:  # records the manifest deletes the registry would get
        def delete_manifest(self, repository: str, digest: str) -> int:
            deleted.append(digest)
            return 1

    content = RegistryContent(FilesystemStorage(layout.root), Registry, tmp_path / "lock")
    plan, skipped = content.delete_unchanged_tags(
        {("team/app", "ci-1"): old, ("team/app", "ci-2"): moved, ("team/app", "gone"): old}
    )
    assert skipped == [("team/app", "ci-2"), ("team/app", "gone")]
    assert [(r.tag, r.digest) for r in plan.removals] == [("ci-1", old)]
    assert deleted == [old]
    assert content_of(layout).repositories["team/app"].tags == {"ci-2": fresh, "fresh": fresh}
