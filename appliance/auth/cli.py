"""`appliance-ctl user|project|member|token|deploy-token ...`: administering the auth data.

`register(subparsers, registry_content)` adds the commands to appliance-ctl's parser;
every handler is `fn(args, context) -> int`, where `context` offers `auth_database`
(Path) and `default_registry_enabled` (bool). `registry_content(context)` opens the
registry's content (appliance.registry_content) for `project delete`, which must not
leave a project's images behind; the caller passes it because only the recipes know
where the registry keeps them. Problems are raised as AuthError subclasses with
one sentence; appliance-ctl prints it and exits non-zero. Passwords are read from stdin
(`--password-stdin`) or an interactive prompt, never from the command line, where
they would land in the shell history and the process list.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from appliance.auth import credentials, tag_rules
from appliance.auth.database import Database, PostgresDatabase
from appliance.auth.database_files import check_database_files, chown_database_files
from appliance.auth.migrations import MIGRATIONS
from appliance.auth.names import path_prefixes, validate_username
from appliance.auth.permissions import ROLES, TOKEN_SCOPES, VISIBILITIES
from appliance.auth.sizes import format_size, parse_size
from appliance.auth.store import Project, Store, schema_version
from appliance.auth.usage import project_bytes, read_json
from appliance.errors import AuthError, UsageError
from appliance.registry_content import GC_NOTE
from appliance.registry_storage import StorageError

if TYPE_CHECKING:
    from appliance.registry_content import RegistryContent


class AuthContext(Protocol):
    auth_database: Database
    default_registry_enabled: bool


class UsageProblem(AuthError):
    """An argument combination or value the command cannot use."""


Handler = Callable[[argparse.Namespace, AuthContext], int]


def register(
    subparsers: argparse._SubParsersAction,
    registry_content: Callable[[AuthContext], RegistryContent] | None = None,
) -> None:
    """Without `registry_content`, `project delete` cannot see the registry and deletes
    the project alone (as it did before content management existed)."""
    _register_user(subparsers)
    _register_project(subparsers, registry_content)
    _register_member(subparsers)
    _register_token(subparsers)
    _register_deploy_token(subparsers)
    _register_history(subparsers)


# -- argument parsing -----------------------------------------------------------------
def _group(subparsers: argparse._SubParsersAction, name: str, help_text: str):
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(
        dest=f"{name.replace('-', '_')}_command", metavar="ACTION", required=True
    )


def _command(group, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def _password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )


def _expiry_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expires",
        metavar="YYYY-MM-DD",
        help="last day the token works (UTC); default: never expires",
    )


def _scope_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        choices=TOKEN_SCOPES,
        help="repeat for several scopes",
    )


def _register_user(subparsers: argparse._SubParsersAction) -> None:
    group = _group(subparsers, "user", "manage user accounts")
    p = _command(group, "create", "create a user (the password is asked for)", user_create)
    p.add_argument("username")
    p.add_argument("--admin", action="store_true", help="may do everything, incl. the catalog")
    _password_option(p)
    _command(group, "list", "list users", user_list)
    p = _command(group, "delete", "delete a user with its memberships and tokens", user_delete)
    p.add_argument("username")
    p = _command(group, "block", "refuse every sign-in of a user, effective at once", user_block)
    p.add_argument("username")
    p = _command(group, "unblock", "allow a blocked user to sign in again", user_unblock)
    p.add_argument("username")
    p = _command(
        group, "passwd", "set a user's password (old one stops working at once)", user_passwd
    )
    p.add_argument("username")
    _password_option(p)


def _register_project(
    subparsers: argparse._SubParsersAction,
    registry_content: Callable[[AuthContext], RegistryContent] | None,
) -> None:
    group = _group(subparsers, "project", "manage projects (repository namespaces)")
    p = _command(group, "create", "create a project such as group/app", project_create)
    p.add_argument("path")
    p.add_argument("--visibility", choices=VISIBILITIES, default="private")
    _registry_switch(p, default=None)
    p.add_argument("--owner", metavar="USERNAME", help="make this user the project's owner")
    _command(group, "list", "list projects", project_list)
    p = _command(
        group, "show", "a project's settings, quota, storage use and tag rules", project_show
    )
    p.add_argument("path")
    p = _command(
        group,
        "update",
        "change a project's visibility, registry switch or quota",
        project_update,
    )
    p.add_argument("path")
    p.add_argument("--visibility", choices=VISIBILITIES)
    _registry_switch(p, default=None)
    p.add_argument(
        "--quota",
        metavar="SIZE",
        help="soft quota, like 20GiB or 500MB ('none' removes it): above it, pushes are "
        "refused with the reason; pulls and deletes go on",
    )
    p.add_argument(
        "--immutable-tags",
        metavar="REGEX",
        action="append",
        help="tags matching this pattern (re.search, e.g. '^v[0-9]+\\.') never move once"
        " pushed; repeat for several; replaces the project's immutable patterns; '' or"
        " 'none' clears them",
    )
    p.add_argument(
        "--protected-tags",
        metavar="PATTERN=ROLE",
        action="append",
        help="only ROLE (developer, maintainer, owner, admin) or above may push or delete"
        " tags matching PATTERN, e.g. 'latest=maintainer'; repeat for several; replaces the"
        " project's protected patterns; '' or 'none' clears them",
    )
    p = _command(
        group,
        "delete",
        "delete a project; one that still has repositories is refused unless --with-images",
        project_delete,
    )
    p.add_argument("path")
    p.add_argument(
        "--with-images",
        action="store_true",
        help="delete the project's repositories too (the blobs are freed by the next "
        "garbage collection)",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(registry_content=registry_content)


def _registry_switch(parser: argparse.ArgumentParser, default: bool | None) -> None:
    switch = parser.add_mutually_exclusive_group()
    switch.add_argument(
        "--registry",
        dest="registry_enabled",
        action="store_true",
        default=default,
        help="enable the container registry for the project",
    )
    switch.add_argument(
        "--no-registry",
        dest="registry_enabled",
        action="store_false",
        help="disable the container registry for the project",
    )


def _register_member(subparsers: argparse._SubParsersAction) -> None:
    group = _group(subparsers, "member", "manage project memberships")
    p = _command(group, "add", "add a member or change its role", member_add)
    p.add_argument("path")
    p.add_argument("username")
    p.add_argument("role", help=f"one of: {', '.join(ROLES)}")
    p = _command(group, "remove", "remove a member", member_remove)
    p.add_argument("path")
    p.add_argument("username")
    p = _command(group, "list", "list a project's members", member_list)
    p.add_argument("path")


def _register_history(subparsers: argparse._SubParsersAction) -> None:
    help_text = "pushes, pulls and deletes the registry reported (newest first)"
    parser = subparsers.add_parser("history", help=help_text, description=help_text)
    parser.set_defaults(handler=history)
    parser.add_argument("repository", nargs="?", help="a repository, or a project's path")
    parser.add_argument("--action", choices=("push", "pull", "delete"))
    parser.add_argument("--limit", type=int, default=50, help="events shown (default 50)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _register_token(subparsers: argparse._SubParsersAction) -> None:
    group = _group(subparsers, "token", "manage personal access tokens")
    p = _command(group, "create", "create a token (shown once)", token_create)
    p.add_argument("username")
    p.add_argument("--name", required=True, help="what the token is for")
    _scope_option(p)
    _expiry_option(p)
    p = _command(group, "list", "list a user's tokens", token_list)
    p.add_argument("username")
    p = _command(group, "revoke", "revoke a token, effective at once", token_revoke)
    p.add_argument("username")
    p.add_argument("id", type=int)


def _register_deploy_token(subparsers: argparse._SubParsersAction) -> None:
    group = _group(subparsers, "deploy-token", "manage project deploy tokens (robot logins)")
    p = _command(group, "create", "create a deploy token (shown once)", deploy_token_create)
    p.add_argument("path")
    p.add_argument("--name", required=True, help="what the token is for")
    _scope_option(p)
    _expiry_option(p)
    p = _command(group, "list", "list a project's deploy tokens", deploy_token_list)
    p.add_argument("path")
    p = _command(group, "revoke", "revoke a deploy token, effective at once", deploy_token_revoke)
    p.add_argument("path")
    p.add_argument("id", type=int)


# -- handlers ---------------------------------------------------------------------------
def _using_store(action: Callable[[argparse.Namespace, Store, AuthContext], int]) -> Handler:
    """Open the database for one command, and leave its files owned as they were.

    appliance-ctl runs as root while the service runs as its own account: a WAL or
    shared-memory file that root creates must not end up unreadable by the service.
    """

    @functools.wraps(action)
    def handler(args: argparse.Namespace, context: AuthContext) -> int:
        if isinstance(context.auth_database, PostgresDatabase):
            return _on_postgres(action, args, context)
        database = Path(context.auth_database)
        check_database_files(database)
        if not database.exists():
            raise AuthError(
                f"The auth database {database} does not exist yet;"
                " run 'appliance-ctl reconfigure' first."
            )
        version = schema_version(database)
        if version is not None and version < len(MIGRATIONS):
            raise AuthError(
                f"The auth database {database} has schema version {version}, this version "
                f"needs {len(MIGRATIONS)}; run 'appliance-ctl reconfigure' first."
            )
        store = Store(database)
        try:
            return action(args, store, context)
        finally:
            store.close()
            _keep_owner(database)

    return handler


def _on_postgres(
    action: Callable[[argparse.Namespace, Store, AuthContext], int],
    args: argparse.Namespace,
    context: AuthContext,
) -> int:
    """The same command on the PostgreSQL database: no files to keep owned."""
    database = context.auth_database
    version = schema_version(database)
    if version is None or version < len(MIGRATIONS):
        raise AuthError(
            f"The auth database {database} has schema version {version or 0}, this version "
            f"needs {len(MIGRATIONS)}; run 'appliance-ctl reconfigure' first."
        )
    store = Store(database)
    try:
        return action(args, store, context)
    finally:
        store.close()


def _keep_owner(database: Path) -> None:
    owner = os.lstat(database)
    chown_database_files(database, owner.st_uid, owner.st_gid)  # never through a link


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise UsageProblem("No terminal to ask the password on; use --password-stdin.")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise UsageProblem("The two passwords differ; nothing was changed.")
    if not password:
        raise UsageProblem("The password is empty; nothing was changed.")
    return password


def _expires_at(args: argparse.Namespace) -> int | None:
    if not args.expires:
        return None
    try:
        day = dt.date.fromisoformat(args.expires)
    except ValueError as error:
        raise UsageProblem(f"--expires '{args.expires}' is not a date like 2030-12-31.") from error
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    if end.timestamp() <= time.time():
        raise UsageProblem(f"--expires {args.expires} is in the past.")
    return int(end.timestamp())


def _when(timestamp: int | None) -> str:
    if timestamp is None:
        return "never"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _expiry(timestamp: int | None) -> str:
    """The last minute a token works (it stops at `timestamp`)."""
    return _when(None if timestamp is None else timestamp - 1)


def _table(headers: tuple[str, ...], rows: list[tuple]) -> None:
    cells = [headers, *[tuple(str(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


@_using_store
def user_create(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    validate_username(args.username)  # complain before asking for a password
    if store.find_user(args.username) is not None:
        raise UsageProblem(f"A user named '{args.username}' exists already.")
    password_hash = credentials.hash_password(_read_password(args))
    store.create_user(args.username, password_hash, admin=args.admin)
    print(f"Created {'administrator' if args.admin else 'user'} {args.username}.")
    return 0


@_using_store
def user_list(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    users = store.list_users()
    _table(
        ("USERNAME", "ADMIN", "BLOCKED", "CREATED"),
        [(u.username, _yes(u.admin), _yes(u.blocked), _when(u.created_at)) for u in users],
    )
    return 0


@_using_store
def user_delete(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    store.delete_user(args.username)
    print(f"Deleted user {args.username}.")
    return 0


@_using_store
def user_block(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    store.set_blocked(args.username, True)
    print(f"Blocked {args.username}: every sign-in is refused from now on.")
    return 0


@_using_store
def user_unblock(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    store.set_blocked(args.username, False)
    print(f"Unblocked {args.username}.")
    return 0


@_using_store
def user_passwd(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    store.user(args.username)  # unknown user: say so before asking for a password
    store.set_password_hash(args.username, credentials.hash_password(_read_password(args)))
    print(f"Changed the password of {args.username}; the old one no longer works.")
    return 0


@_using_store
def project_create(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    if args.owner:
        store.user(args.owner)
    enabled = (
        context.default_registry_enabled if args.registry_enabled is None else args.registry_enabled
    )
    project = store.create_project(args.path, args.visibility, enabled)
    if args.owner:
        store.add_member(project.path, args.owner, "owner")
    state = "enabled" if project.registry_enabled else "disabled"
    print(f"Created {project.visibility} project {project.path} (registry {state}).")
    return 0


def _usage_of(store: Store, context: AuthContext) -> tuple[dict | None, dict[str, int]]:
    """The computed figures (None before the first `appliance-ctl usage`) and, per
    project, the bytes pushed since."""
    paths = getattr(context, "paths", None)
    figures = read_json(paths.registry_usage_file) if paths is not None else None
    return figures, store.pending_usage(float((figures or {}).get("computed_at", 0.0)))


def _used(figures: dict | None, pending: dict[str, int], path: str) -> str:
    if figures is None and path not in pending:
        return "?"
    return format_size(project_bytes(figures, pending, path))


@_using_store
def project_list(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    projects = store.list_projects()
    figures, pending = _usage_of(store, context)
    _table(
        ("PATH", "VISIBILITY", "REGISTRY", "USED", "QUOTA", "CREATED"),
        [
            (
                p.path,
                p.visibility,
                "enabled" if p.registry_enabled else "disabled",
                _used(figures, pending, p.path),
                "-" if p.quota_bytes is None else format_size(p.quota_bytes),
                _when(p.created_at),
            )
            for p in projects
        ],
    )
    return 0


@_using_store
def project_show(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    project = store.project(args.path)
    figures, pending = _usage_of(store, context)
    used = project_bytes(figures, pending, project.path)
    computed = (figures or {}).get("projects", {}).get(project.path, {})
    lines = [
        ("path", project.path),
        ("visibility", project.visibility),
        ("registry", "enabled" if project.registry_enabled else "disabled"),
        ("created", _when(project.created_at)),
        ("members", str(len(store.list_members(project.path)))),
        ("quota", "none" if project.quota_bytes is None else format_size(project.quota_bytes)),
    ]
    if figures is None and project.path not in pending:
        lines.append(("used", "? (run appliance-ctl usage to compute it)"))
    else:
        lines.append(("used", f"{format_size(used)} ({used} bytes)"))
        lines.append(("shared", format_size(int(computed.get("shared_bytes", 0)))))
        if figures is not None:
            lines.append(("computed", f"{_when(int(figures['computed_at']))}, plus pushes since"))
    if project.quota_bytes is not None and used > project.quota_bytes:
        lines.append(("pushes", "refused: over quota"))
    for name, value in lines:
        print(f"{name + ':':<12}{value}")
    _print_tag_rules(store, project)
    return 0


@_using_store
def project_update(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    immutable, protected = args.immutable_tags, args.protected_tags
    if (
        args.visibility is None
        and args.registry_enabled is None
        and args.quota is None
        and immutable is None
        and protected is None
    ):
        raise UsageProblem(
            "Nothing to change: give --visibility, --registry, --no-registry, --quota,"
            " --immutable-tags or --protected-tags."
        )
    # Every value is checked before anything is written.
    quota = None
    if args.quota is not None and args.quota.strip().lower() not in ("none", "off"):
        quota = parse_size(args.quota)
    immutable_rules = None if immutable is None else tag_rules.parse_immutable(immutable)
    protected_rules = None if protected is None else tag_rules.parse_protected(protected)
    project = store.project(args.path)  # unknown project: say so before changing anything
    if args.visibility is not None or args.registry_enabled is not None:
        project = store.update_project(args.path, args.visibility, args.registry_enabled)
        state = "enabled" if project.registry_enabled else "disabled"
        print(f"Project {project.path} is now {project.visibility} with its registry {state}.")
    if args.quota is not None:
        project = store.set_quota(args.path, quota)
        if quota is None:
            print(f"Project {project.path} has no quota.")
        else:
            figures, pending = _usage_of(store, context)
            used = project_bytes(figures, pending, project.path)
            over = " (over it: pushes are refused)" if used > quota else ""
            known = "" if figures is not None else "; run appliance-ctl usage to compute its use"
            print(
                f"Project {project.path} has a quota of {format_size(quota)}; it uses "
                f"{format_size(used)}{over}{known}."
            )
    if immutable_rules is not None:
        store.set_tag_rules(project.path, tag_rules.IMMUTABLE, immutable_rules)
    if protected_rules is not None:
        store.set_tag_rules(project.path, tag_rules.PROTECTED, protected_rules)
    if immutable_rules is not None or protected_rules is not None:
        _print_tag_rules(store, project)
    return 0


def _print_tag_rules(store: Store, project: Project) -> None:
    rules = store.tag_rules(project.id)
    immutable = [str(r) for r in rules if r.kind == tag_rules.IMMUTABLE]
    protected = [str(r) for r in rules if r.kind == tag_rules.PROTECTED]
    print(f"Immutable tags of {project.path}: {_patterns(immutable)}")
    print(f"Protected tags of {project.path}: {_patterns(protected)}")


def _patterns(patterns: list[str]) -> str:
    return ", ".join(f"'{p}'" for p in patterns) if patterns else "none"


@_using_store
def project_delete(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    """A project is a namespace of repositories: deleting it while its repositories stay
    would leave images nobody but an admin can reach (or the next project of that path
    inherits). So a project with repositories is refused unless --with-images, which
    deletes them first (a repository under a deeper project belongs to that one)."""
    project = store.project(args.path)
    repositories: list[str] = []
    opener = args.registry_content
    content = None
    if opener is not None:
        try:
            content = opener(context)
            paths = [p.path for p in store.list_projects()]
            repositories = content.project_repositories(project.path, paths)
        except StorageError as error:
            if args.with_images:
                raise
            print(f"Note: its images, if any, stay in the registry ({error})")
    elif args.with_images:
        raise UsageProblem("--with-images needs the registry's storage; nothing was deleted.")
    if repositories and not args.with_images:
        them = "them" if len(repositories) > 1 else "it"
        raise UsageProblem(
            f"Project {project.path} still holds {_repositories(repositories)}; delete "
            f"{them} with the project (appliance-ctl project delete {project.path} "
            f"--with-images) or first (appliance-ctl repo delete). Nothing was deleted."
        )
    if repositories and content is not None:
        confirm(f"Delete project {project.path} and its {_repositories(repositories)}?", args.yes)
        content.delete_repositories(repositories, print, holder="project delete --with-images")
    store.delete_project(project.path)
    print(f"Deleted project {project.path}.")
    if repositories:
        print(GC_NOTE)
    return 0


def _repositories(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} repositor{'ies' if len(names) != 1 else 'y'} ({shown})"


def confirm(question: str, assume_yes: bool) -> None:
    """Ask before an irreversible delete of images; `--yes` answers for a script. With
    no terminal to ask on and no --yes, refuse (as a password prompt does)."""
    if assume_yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(
            "No terminal to ask for confirmation on; add --yes to delete without asking. "
            "Nothing was deleted."
        )
    answer = input(f"{question} [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise UsageError("Not confirmed; nothing was deleted.")


def project_lookup(context: AuthContext) -> Callable[[str], str | None]:
    """The project a repository belongs to, for commands outside auth (`repo list`): the
    longest project path it is under, else its user's personal namespace
    ('alice (personal)'), as the token service decides. Nothing without a database."""
    on_postgres = isinstance(context.auth_database, PostgresDatabase)
    database = context.auth_database
    if not on_postgres:
        database = Path(database)
        if not database.exists():
            return lambda name: None
        check_database_files(database)
    store = Store(database)
    try:
        projects = {p.path for p in store.list_projects()}
        users = {u.username for u in store.list_users()}
    finally:
        store.close()
        if not on_postgres:
            _keep_owner(database)

    def project_of(repository: str) -> str | None:
        found = next((p for p in path_prefixes(repository) if p in projects), None)
        namespace = repository.split("/", 1)[0]
        if found is None and namespace in users:
            return f"{namespace} (personal)"
        return found

    return project_of


@_using_store
def member_add(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    store.add_member(args.path, args.username, args.role)
    print(f"{args.username} is now {args.role} of {args.path}.")
    return 0


@_using_store
def member_remove(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    store.remove_member(args.path, args.username)
    print(f"Removed {args.username} from {args.path}.")
    return 0


@_using_store
def member_list(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    members = store.list_members(args.path)
    _table(("USERNAME", "ROLE"), [(m.username, m.role) for m in members])
    return 0


@_using_store
def token_create(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    token, secret = store.create_personal_access_token(
        args.username, args.name, args.scopes, _expires_at(args)
    )
    print(
        f"Created personal access token {token.id} ({token.name}) for {args.username},"
        f" scopes {', '.join(sorted(token.scopes))}, expires {_expiry(token.expires_at)}."
    )
    print("Use it as the password of 'docker login'. It is shown only this once:")
    print(secret)
    return 0


@_using_store
def token_list(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    tokens = store.list_personal_access_tokens(args.username)
    now = time.time()
    _table(
        ("ID", "NAME", "SCOPES", "EXPIRES", "STATE"),
        [
            (
                t.id,
                t.name,
                ",".join(sorted(t.scopes)),
                _expiry(t.expires_at),
                _state(t.revoked, t.usable(now)),
            )
            for t in tokens
        ],
    )
    return 0


@_using_store
def token_revoke(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    store.revoke_personal_access_token(args.username, args.id)
    print(f"Revoked personal access token {args.id} of {args.username}.")
    return 0


@_using_store
def deploy_token_create(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    token, secret = store.create_deploy_token(args.path, args.name, args.scopes, _expires_at(args))
    print(
        f"Created deploy token {token.id} ({token.name}) for {token.project_path},"
        f" scopes {', '.join(sorted(token.scopes))}, expires {_expiry(token.expires_at)}."
    )
    print("Sign in with this username and password; the password is shown only this once:")
    print(f"username: {token.username}")
    print(f"password: {secret}")
    return 0


@_using_store
def deploy_token_list(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    tokens = store.list_deploy_tokens(args.path)
    now = time.time()
    _table(
        ("ID", "NAME", "USERNAME", "SCOPES", "EXPIRES", "STATE"),
        [
            (
                t.id,
                t.name,
                t.username,
                ",".join(sorted(t.scopes)),
                _expiry(t.expires_at),
                _state(t.revoked, t.usable(now)),
            )
            for t in tokens
        ],
    )
    return 0


@_using_store
def deploy_token_revoke(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    store.revoke_deploy_token(args.path, args.id)
    print(f"Revoked deploy token {args.id} of {args.path}.")
    return 0


@_using_store
def history(args: argparse.Namespace, store: Store, context: AuthContext) -> int:
    if args.limit < 1:
        raise UsageProblem("--limit must be at least 1.")
    events = store.history(args.repository, args.action, args.limit)
    if args.json:
        for event in events:
            print(json.dumps(dataclasses.asdict(event), sort_keys=True))
        return 0
    _table(
        ("TIME", "ACTION", "REPOSITORY", "TAG", "DIGEST", "BY", "FROM"),
        [
            (
                dt.datetime.fromtimestamp(e.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                e.action,
                e.repository,
                e.tag or "-",
                (e.digest or "-")[:19],
                e.actor or "(anonymous)",
                e.address or "-",
            )
            for e in events
        ],
    )
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _state(revoked: bool, usable: bool) -> str:
    return "revoked" if revoked else ("active" if usable else "expired")
