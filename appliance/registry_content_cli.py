"""`appliance-ctl repo list|delete` and `tag list|delete`: the registry's content.

`register(subparsers, open_content)` adds the commands to appliance-ctl's parser. The
caller passes `open_content(settings) -> RegistryContent` (built by the recipes, which
know where the registry keeps its storage and how it is reached), so this module needs
no recipe. Every handler is `fn(args, settings) -> int`; `--json` prints what a script
reads, the default a table. The CLI acts as an administrator (root on the host): the
permission model for registry clients is the token service's (maintainers, owners and
admins may delete).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance import retention
from appliance.auth.cli import confirm, project_lookup
from appliance.auth.sizes import format_size
from appliance.errors import UsageError
from appliance.registry_content import (
    GC_NOTE,
    check_repository,
    parse_tag_reference,
    repository_rows,
    short_digest,
)

if TYPE_CHECKING:
    from appliance.registry_content import RegistryContent
    from appliance.settings import Settings

OpenContent = Callable[["Settings"], "RegistryContent"]


def register(subparsers: argparse._SubParsersAction, open_content: OpenContent) -> None:
    repo = subparsers.add_parser(
        "repo", help="list and delete the registry's repositories", description="repositories"
    )
    group = repo.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    p = group.add_parser("list", help="repositories with their project and tag count (and sizes)")
    p.add_argument(
        "project",
        nargs="?",
        metavar="PROJECT",
        help="only the repositories at or under this path (a project's, or any namespace)",
    )
    p.add_argument(
        "--sizes",
        action="store_true",
        help="the bytes each repository holds (a blob it uses twice counts once)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=repo_list, open_content=open_content)
    p = group.add_parser(
        "delete",
        help="delete a repository: every tag and manifest; it leaves the catalog "
        "(the blobs are freed by the next garbage collection)",
    )
    p.add_argument("repository")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=repo_delete, open_content=open_content)

    tag = subparsers.add_parser(
        "tag", help="list and delete a repository's tags", description="tags"
    )
    group = tag.add_subparsers(dest="tag_command", metavar="ACTION", required=True)
    p = group.add_parser("list", help="tags with digest, platforms, size and creation date")
    p.add_argument("repository")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=tag_list, open_content=open_content)
    p = group.add_parser(
        "delete",
        help="remove tags; other tags on the same manifest are kept, a manifest no tag "
        "reaches any more is deleted",
    )
    p.add_argument("references", nargs="+", metavar="REPOSITORY:TAG")
    p.set_defaults(handler=tag_delete, open_content=open_content)


def _table(headers: tuple[str, ...], rows: list[tuple]) -> None:
    cells = [headers, *[tuple(str(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def repo_list(args: argparse.Namespace, settings: Settings) -> int:
    if args.project:
        check_repository(args.project)
    project_of = project_lookup(settings)
    rows = args.open_content(settings).repositories(args.project, project_of, args.sizes)
    if args.project and not rows and project_of(args.project) != args.project:
        raise UsageError(f"There is no project {args.project} and no repository under it.")
    if args.json:
        print(json.dumps([row.to_json() for row in rows], indent=2))
        return 0
    headers = ("REPOSITORY", "PROJECT", "TAGS") + (("SIZE",) if args.sizes else ())
    _table(
        headers,
        [
            (row.name, row.project or "-", row.tags)
            + ((format_size(row.size or 0),) if args.sizes else ())
            for row in rows
        ],
    )
    return 0


def tag_list(args: argparse.Namespace, settings: Settings) -> int:
    content = args.open_content(settings)
    rows = content.tags(args.repository)
    history = tag_history(settings, args.repository, {row.tag: row.digest for row in rows})
    if args.json:
        print(
            json.dumps(
                [{**row.to_json(), **_history_json(history.get(row.tag))} for row in rows],
                indent=2,
            )
        )
        return 0
    _table(
        ("TAG", "DIGEST", "PLATFORMS", "SIZE", "CREATED", "PUSHED", "PUSHED BY", "LAST PULLED"),
        [
            (
                row.tag,
                short_digest(row.digest),
                ",".join(row.platforms) or "-",
                format_size(row.size),
                row.created.strftime("%Y-%m-%d %H:%M:%S UTC") if row.created else "-",
                _minute(history[row.tag].pushed_at) if row.tag in history else "-",
                (history[row.tag].pushed_by or "(anonymous)")
                if row.tag in history and history[row.tag].pushed_at
                else "-",
                _minute(history[row.tag].last_pulled) if row.tag in history else "-",
            )
            for row in rows
        ],
    )
    return 0


def tag_history(
    settings: Settings, repository: str, tags: dict[str, str]
) -> dict[str, retention.TagFacts]:
    """Each tag's last push (time, pusher) and last pull, from the registry's events in
    the auth database (the retention policies read the same); none without a database."""
    from appliance.auth.database import PostgresDatabase
    from appliance.auth.migrations import MIGRATIONS
    from appliance.auth.store import admin_store, schema_version

    database = settings.auth_database
    missing = not isinstance(database, PostgresDatabase) and not database.exists()
    if missing or schema_version(database) != len(MIGRATIONS):
        return {}
    with admin_store(database) as store:
        events = [
            retention.Event(e.action, e.tag, e.digest, e.actor, e.at)
            for e in store.tag_events(repository)
        ]
    return {f.tag: f for f in retention.tag_facts(repository, tags, events)}


def _minute(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at)) if at else "-"


def _history_json(facts: retention.TagFacts | None) -> dict:
    return {
        "pushed_at": facts.pushed_at if facts else None,
        "pushed_by": facts.pushed_by if facts else None,
        "last_pulled": facts.last_pulled if facts else None,
    }


def tag_delete(args: argparse.Namespace, settings: Settings) -> int:
    references = [parse_tag_reference(text) for text in args.references]
    plan = args.open_content(settings).delete_tags(references)
    for line in plan.lines():
        print(line)
    if plan.deletions:
        print(GC_NOTE)
    return 0


def repo_delete(args: argparse.Namespace, settings: Settings) -> int:
    """Asks first (as the admin typed one name, a whole repository goes), unless --yes."""
    name = check_repository(args.repository)
    content = args.open_content(settings)
    rows = repository_rows(content.snapshot(), name, sizes=True)
    if not any(row.name == name for row in rows):
        raise UsageError(f"There is no repository {name} in the registry; nothing was deleted.")
    [row] = [row for row in rows if row.name == name]
    nested = len(rows) - 1
    note = ""
    if nested:
        note = f"; {nested} repositor{'ies' if nested > 1 else 'y'} under it stay"
        note += "" if nested > 1 else "s"
    confirm(
        f"Delete repository {name} with its {row.tags} tag{'s' if row.tags != 1 else ''} "
        f"({format_size(row.size or 0)}){note}?",
        args.yes,
    )
    content.delete_repositories([name], print)
    print(GC_NOTE)
    return 0
