"""Everything the admin API and the web pages offer, as one function per operation.

The JSON API (appliance/auth/api.py) and the pages call these and nothing else, so both
answer the same and check the same permissions ("one implementation for both"). Each
function takes the `Context` (the store, the registry's content, the token service's
repository decision) and the acting `Principal`, and returns plain dataclasses the
caller renders as JSON or HTML. A problem is an `OperationError` carrying one sentence
and its HTTP status: `Forbidden` (403), `NotFound` (404), `Invalid` (400), `Conflict`
(409).

Permissions are the token service's: what a principal may do on a repository is
`Context.decide` (TokenService.decide_repository: permissions.decide with the project's
role, visibility, quota and the maintenance window), so the API can never grant a delete
that `docker`/`skopeo` would be refused, or refuse a pull they would get. Listing a
project's repositories needs `pull` on the project's path; deleting needs `delete` on the
repository (maintainers, owners, admins). Account-level operations use roles directly:
deploy tokens need maintainer or owner, members need owner, users and projects need an
administrator. A deploy token is not a user: it may not use the API at all.

A personal access token reaches the API only with the `api` scope (checked where the
request is authenticated, `require_api_principal`); like GitLab's `api` scope it then acts
with its user's roles (permissions.PERSONAL_TOKEN_SCOPE_ACTIONS).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from appliance import retention
from appliance.auth import names
from appliance.auth.permissions import (
    API,
    DELETE,
    DEPLOY_TOKEN,
    PERSONAL_TOKEN_SCOPES,
    PULL,
    ROLES,
    TOKEN_SCOPES,
    USER,
    VISIBILITIES,
    Decision,
    Principal,
)
from appliance.auth.sizes import parse_size
from appliance.auth.store import (
    AlreadyExistsError,
    DeployToken,
    InvalidValueError,
    NotFoundError,
    PersonalAccessToken,
    Project,
    Store,
)
from appliance.auth.usage import project_bytes, project_history
from appliance.errors import ApplianceError, AuthError, UsageError
from appliance.registry_content import (
    PlatformManifest,
    RepositoryRow,
    TagDeletePlan,
    TagRow,
    check_repository,
    owning_project,
)


class OperationError(ApplianceError):
    """An operation refused, with the HTTP status the API answers."""

    status = 400


class Forbidden(OperationError):
    status = 403


class NotFound(OperationError):
    status = 404


class Invalid(OperationError):
    status = 400


class Conflict(OperationError):
    status = 409


class RegistryContentSource(Protocol):
    """What the operations need of the registry's content: appliance.registry_content's
    RegistryContent (storage, as appliance-ctl runs it) or its API twin for the service."""

    def repositories(
        self,
        path: str | None = None,
        project_of: Callable[[str], str | None] = ...,
        sizes: bool = False,
    ) -> list[RepositoryRow]: ...

    def tags(self, name: str) -> list[TagRow]: ...

    def delete_tags(self, references: Iterable[tuple[str, str]]) -> TagDeletePlan: ...

    def delete_repositories(
        self, names: Iterable[str], say: Callable[[str], None], holder: str = ...
    ) -> None: ...


@dataclass
class Context:
    """What every operation may use. `decide` is TokenService.decide_repository (the
    token service's one rule); `content` opens the registry's content when an operation
    needs it; `usage_figures` reads the usage figures file (None: not computed yet)."""

    store: Store
    decide: Callable[[Principal, str, list[str]], Decision]
    content: Callable[[], RegistryContentSource]
    default_registry_enabled: bool = True
    usage_figures: Callable[[], dict | None] = lambda: None
    hash_password: Callable[[str], str] | None = None
    clock: Callable[[], float] = time.time
    default_retention: retention.Policy | None = None
    usage_history: Callable[[], list[dict]] = lambda: []
    """The recorded usage computations (appliance/auth/usage.read_history), oldest first."""
    tag_delete_refusal: Callable[[Principal, str, str | None], str] | None = None
    """The tag rules' refusal of deleting a tag (None: every tag of the repository) for
    this principal ('' when allowed): TokenService.tag_delete_refusal, the decision a
    client's manifest DELETE gets from the tag gate in front of the registry."""


# ---------------------------------------------------------------- views (what callers render)


@dataclass(frozen=True)
class ProjectView:
    path: str
    visibility: str
    registry_enabled: bool
    created_at: int
    quota_bytes: int | None
    used_bytes: int | None  # None: never computed (appliance-ctl usage) and nothing pushed
    role: str | None  # the principal's role there (None: not a member)
    can_delete: bool  # may delete its tags and repositories

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "visibility": self.visibility,
            "registry_enabled": self.registry_enabled,
            "created_at": self.created_at,
            "quota_bytes": self.quota_bytes,
            "used_bytes": self.used_bytes,
            "role": self.role,
            "can_delete": self.can_delete,
        }


@dataclass(frozen=True)
class RepositoryView:
    name: str
    project: str
    tags: int
    size: int

    def to_json(self) -> dict:
        return {"name": self.name, "project": self.project, "tags": self.tags, "size": self.size}


@dataclass(frozen=True)
class TagView:
    repository: str
    tag: str
    digest: str
    media_type: str
    platforms: tuple[str, ...]
    size: int
    created: str | None  # RFC 3339, the image config's
    pushed_at: float | None  # from the push history where it exists
    pushed_by: str | None
    last_pulled: float | None
    manifests: tuple[PlatformManifest, ...] = ()  # an index's platform manifests

    def to_json(self) -> dict:
        return {
            "repository": self.repository,
            "tag": self.tag,
            "digest": self.digest,
            "media_type": self.media_type,
            "platforms": list(self.platforms),
            "size": self.size,
            "created": self.created,
            "pushed_at": self.pushed_at,
            "pushed_by": self.pushed_by,
            "last_pulled": self.last_pulled,
            "manifests": [m.to_json() for m in self.manifests],
        }


@dataclass(frozen=True)
class TokenView:
    id: int
    name: str
    scopes: tuple[str, ...]
    expires_at: int | None
    created_at: int
    state: str  # active, expired, revoked
    username: str | None = None  # a deploy token's sign-in name
    secret: str | None = field(default=None, repr=False)  # only in the answer to create

    @classmethod
    def of(
        cls, token: PersonalAccessToken | DeployToken, state: str, secret: str | None = None
    ) -> TokenView:
        """The view of a personal access token or a deploy token (with its username)."""
        return cls(
            token.id,
            token.name,
            tuple(sorted(token.scopes)),
            token.expires_at,
            token.created_at,
            state,
            username=token.username if isinstance(token, DeployToken) else None,
            secret=secret,
        )

    def to_json(self) -> dict:
        body = {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "state": self.state,
        }
        if self.username is not None:
            body["username"] = self.username
        if self.secret is not None:
            body["secret"] = self.secret
        return body


@dataclass(frozen=True)
class UserView:
    username: str
    admin: bool
    blocked: bool
    created_at: int

    def to_json(self) -> dict:
        return {
            "username": self.username,
            "admin": self.admin,
            "blocked": self.blocked,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class MemberView:
    username: str
    role: str

    def to_json(self) -> dict:
        return {"username": self.username, "role": self.role}


# ---------------------------------------------------------------- who may use the API


def require_api_principal(principal: Principal) -> Principal:
    """The API and the pages act for users: a deploy token is refused, and a personal
    access token needs the `api` scope."""
    if principal.kind == DEPLOY_TOKEN:
        raise Forbidden("Deploy tokens may only pull and push; sign in as a user to use the API.")
    if principal.kind != USER:
        raise Forbidden("Sign in to use the API.")
    if principal.token_scopes is not None and API not in principal.token_scopes:
        raise Forbidden(
            "This personal access token has no 'api' scope; create one with the api scope "
            "or sign in with your password."
        )
    return principal


def _require_user(principal: Principal) -> Principal:
    require_api_principal(principal)
    return principal


def _require_admin(principal: Principal) -> None:
    _require_user(principal)
    if not principal.admin:
        raise Forbidden("Only administrators may do this.")


# ---------------------------------------------------------------- projects


def _role(ctx: Context, principal: Principal, project: Project) -> str | None:
    return _roles(ctx, principal).get(project.path)


def _roles(ctx: Context, principal: Principal) -> dict[str, str]:
    """Every project path where the principal is a member, with its role."""
    if principal.user_id is None:
        return {}
    return ctx.store.roles_of(principal.user_id)


def _sees(principal: Principal, project: Project, role: str | None) -> bool:
    """A project is listed to its members, to admins, and where its visibility lets the
    principal pull (public: everyone; internal: every signed-in user)."""
    if principal.admin or role is not None:
        return True
    if project.visibility == "public":
        return True
    return project.visibility == "internal" and principal.kind == USER


def _used(ctx: Context, path: str) -> int | None:
    figures = ctx.usage_figures()
    pending = ctx.store.pending_usage(float((figures or {}).get("computed_at", 0.0)))
    if figures is None and path not in pending:
        return None
    return project_bytes(figures, pending, path)


def _project_view(
    ctx: Context, principal: Principal, project: Project, role: str | None
) -> ProjectView:
    decision = ctx.decide(principal, project.path, [DELETE])
    return ProjectView(
        project.path,
        project.visibility,
        project.registry_enabled,
        project.created_at,
        project.quota_bytes,
        _used(ctx, project.path),
        role,
        DELETE in decision.granted,
    )


def list_projects(ctx: Context, principal: Principal) -> list[ProjectView]:
    """The projects the principal can see, by path."""
    _require_user(principal)
    roles = _roles(ctx, principal)
    return [
        _project_view(ctx, principal, p, roles.get(p.path))
        for p in ctx.store.list_projects()
        if _sees(principal, p, roles.get(p.path))
    ]


def _visible_project(ctx: Context, principal: Principal, path: str) -> tuple[Project, str | None]:
    """The project, or NotFound when it does not exist or the principal may not see it
    (a private project's existence is not told to outsiders)."""
    _require_user(principal)
    project = ctx.store.find_project(path)
    role = _role(ctx, principal, project) if project else None
    if project is None or not _sees(principal, project, role):
        raise NotFound(f"There is no project '{path}' you can see.")
    return project, role


def get_project(ctx: Context, principal: Principal, path: str) -> ProjectView:
    project, role = _visible_project(ctx, principal, path)
    return _project_view(ctx, principal, project, role)


def _need(ctx: Context, principal: Principal, repository: str, action: str) -> Decision:
    decision = ctx.decide(principal, repository, [action])
    if decision.refusal:
        raise Conflict(decision.refusal)
    if action not in decision.granted:
        raise Forbidden(f"You may not {action} {repository}: {decision.reason}.")
    return decision


def list_repositories(ctx: Context, principal: Principal, path: str) -> list[RepositoryView]:
    """The project's repositories (those under it and not under a deeper project) with
    the bytes each holds. Needs pull on the project, as the registry would."""
    project, _ = _visible_project(ctx, principal, path)
    _need(ctx, principal, project.path, PULL)
    paths = [p.path for p in ctx.store.list_projects()]
    rows = ctx.content().repositories(project.path, lambda name: None, True)
    return [
        RepositoryView(row.name, project.path, row.tags, row.size or 0)
        for row in rows
        if owning_project(row.name, paths) == project.path
    ]


def _check_repository(name: str) -> str:
    try:
        return check_repository(name)
    except UsageError as error:
        raise Invalid(str(error)) from None


def list_tags(ctx: Context, principal: Principal, repository: str) -> list[TagView]:
    """Every tag with digest, platforms, size, and its last push (time, pusher) and last
    pull from the registry's events where they exist."""
    _require_user(principal)
    name = _check_repository(repository)
    _need_pull_or_hide(ctx, principal, name)
    try:
        rows = ctx.content().tags(name)
    except UsageError as error:  # no such repository
        raise NotFound(str(error)) from None
    history = _history(ctx, name, {row.tag: row.digest for row in rows})
    return [_tag_view(name, row, history.get(row.tag)) for row in rows]


def _need_pull_or_hide(ctx: Context, principal: Principal, name: str) -> None:
    """Without pull, a repository is not found (as the registry answers), not forbidden:
    a private project's repository names are not told to outsiders."""
    decision = ctx.decide(principal, name, [PULL])
    if PULL not in decision.granted:
        raise NotFound(f"There is no repository {name} you can see.")


def get_tag(ctx: Context, principal: Principal, repository: str, tag: str) -> TagView:
    for view in list_tags(ctx, principal, repository):
        if view.tag == tag:
            return view
    raise NotFound(f"Repository {repository} has no tag {tag}.")


def _history(ctx: Context, repository: str, tags: dict[str, str]) -> dict:
    events = [
        retention.Event(e.action, e.tag, e.digest, e.actor, e.at)
        for e in ctx.store.tag_events(repository)
    ]
    return {f.tag: f for f in retention.tag_facts(repository, tags, events)}


def _tag_view(name: str, row: TagRow, facts: retention.TagFacts | None) -> TagView:
    created = row.created.strftime("%Y-%m-%dT%H:%M:%SZ") if row.created else None
    return TagView(
        name,
        row.tag,
        row.digest,
        row.media_type,
        row.platforms,
        row.size,
        created,
        facts.pushed_at if facts else None,
        facts.pushed_by if facts and facts.pushed_at else None,
        facts.last_pulled if facts else None,
        row.manifests,
    )


def delete_tag(ctx: Context, principal: Principal, repository: str, tag: str) -> list[str]:
    """Remove one tag (maintainers, owners, admins: the token service's delete); the
    lines say what was deleted. Other tags on the same manifest are kept."""
    _require_user(principal)
    name = _check_repository(repository)
    _need_pull_or_hide(ctx, principal, name)
    _need(ctx, principal, name, DELETE)
    content = ctx.content()
    try:
        if tag not in {row.tag for row in content.tags(name)}:
            raise NotFound(f"Repository {name} has no tag {tag}.")
        _tag_rules(ctx, principal, name, tag)
        plan = content.delete_tags([(name, tag)])
    except UsageError as error:
        raise Conflict(str(error)) from None
    return plan.lines()


def _tag_rules(ctx: Context, principal: Principal, repository: str, tag: str | None) -> None:
    """An immutable tag, or one protected above the principal's role, is not deleted
    here either (nor is a manifest such a tag points at)."""
    if ctx.tag_delete_refusal is None:
        return
    refusal = ctx.tag_delete_refusal(principal, repository, tag)
    if refusal:
        raise Forbidden(refusal[0].upper() + refusal[1:] + ".")


def delete_repository(ctx: Context, principal: Principal, repository: str) -> list[str]:
    """Delete a repository with every tag (maintainers, owners, admins)."""
    _require_user(principal)
    name = _check_repository(repository)
    _need_pull_or_hide(ctx, principal, name)
    _need(ctx, principal, name, DELETE)
    content = ctx.content()
    if not any(row.name == name for row in content.repositories(name)):
        raise NotFound(f"There is no repository {name} in the registry.")
    _tag_rules(ctx, principal, name, None)
    lines: list[str] = []
    try:
        content.delete_repositories([name], lines.append, holder="api repository delete")
    except UsageError as error:
        raise Conflict(str(error)) from None
    return lines


# ---------------------------------------------------------------- personal access tokens


def token_state(revoked: bool, usable: bool) -> str:
    return "revoked" if revoked else ("active" if usable else "expired")


def list_tokens(ctx: Context, principal: Principal) -> list[TokenView]:
    _require_user(principal)
    now = ctx.clock()
    return [
        TokenView.of(t, token_state(t.revoked, t.usable(now)))
        for t in ctx.store.list_personal_access_tokens(principal.name)
    ]


def parse_expiry(text: str | None, now: float, option: str = "expires") -> int | None:
    """'2030-12-31' -> the end of that day (UTC) as a timestamp; None: never expires.
    `option` names the input in the sentence (appliance-ctl passes '--expires')."""
    if not text:
        return None
    try:
        day = dt.date.fromisoformat(str(text))
    except ValueError:
        raise Invalid(f"{option} '{text}' is not a date like 2030-12-31.") from None
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    if end.timestamp() <= now:
        raise Invalid(f"{option} {text} is in the past.")
    return int(end.timestamp())


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise Invalid(f"Give the {what} a name of 1 to 100 characters.")
    return name.strip()


def _check_scopes(scopes: object, allowed: tuple[str, ...]) -> list[str]:
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise Invalid(f"Give at least one scope: {', '.join(allowed)}.")
    for scope in scopes:
        if scope not in allowed:
            raise Invalid(
                f"'{scope}' is not a valid token scope; choose from {', '.join(allowed)}."
            )
    return sorted(set(scopes))


def create_token(
    ctx: Context, principal: Principal, name: object, scopes: object, expires: str | None = None
) -> TokenView:
    """A new personal access token of the principal; its secret is in the answer only."""
    _require_user(principal)
    name = _check_name(name, "token")
    chosen = _check_scopes(scopes, PERSONAL_TOKEN_SCOPES)
    expires_at = parse_expiry(expires, ctx.clock())
    token, secret = _store_call(
        ctx.store.create_personal_access_token, principal.name, name, chosen, expires_at
    )
    return TokenView.of(token, "active", secret)


def revoke_token(ctx: Context, principal: Principal, token_id: int) -> None:
    _require_user(principal)
    _store_call(ctx.store.revoke_personal_access_token, principal.name, int(token_id))


# ---------------------------------------------------------------- deploy tokens (maintainers)


def _manage(ctx: Context, principal: Principal, path: str, roles: tuple[str, ...]) -> Project:
    project, role = _visible_project(ctx, principal, path)
    if not principal.admin and role not in roles:
        raise Forbidden(
            f"Only {' and '.join(r + 's' for r in roles)} of project {path} "
            f"(or administrators) may do this."
        )
    return project


MAINTAINERS = ("maintainer", "owner")
OWNERS = ("owner",)


def list_deploy_tokens(ctx: Context, principal: Principal, path: str) -> list[TokenView]:
    project = _manage(ctx, principal, path, MAINTAINERS)
    now = ctx.clock()
    return [
        TokenView.of(t, token_state(t.revoked, t.usable(now)))
        for t in ctx.store.list_deploy_tokens(project.path)
    ]


def create_deploy_token(
    ctx: Context,
    principal: Principal,
    path: str,
    name: object,
    scopes: object,
    expires: str | None = None,
) -> TokenView:
    project = _manage(ctx, principal, path, MAINTAINERS)
    name = _check_name(name, "deploy token")
    chosen = _check_scopes(scopes, TOKEN_SCOPES)
    expires_at = parse_expiry(expires, ctx.clock())
    token, secret = _store_call(
        ctx.store.create_deploy_token, project.path, name, chosen, expires_at
    )
    return TokenView.of(token, "active", secret)


def revoke_deploy_token(ctx: Context, principal: Principal, path: str, token_id: int) -> None:
    project = _manage(ctx, principal, path, MAINTAINERS)
    _store_call(ctx.store.revoke_deploy_token, project.path, int(token_id))


# ---------------------------------------------------------------- members (owners)


def list_members(ctx: Context, principal: Principal, path: str) -> list[MemberView]:
    """Every member can see who else is; changing needs an owner."""
    project, role = _visible_project(ctx, principal, path)
    if not principal.admin and role is None:
        raise Forbidden(f"Only members of project {path} may see its members.")
    return [MemberView(m.username, m.role) for m in ctx.store.list_members(project.path)]


def set_member(ctx: Context, principal: Principal, path: str, username: str, role: str) -> None:
    project = _manage(ctx, principal, path, OWNERS)
    if role not in ROLES:
        raise Invalid(f"'{role}' is not a valid role; choose one of: {', '.join(ROLES)}.")
    _store_call(ctx.store.add_member, project.path, username, role)


def remove_member(ctx: Context, principal: Principal, path: str, username: str) -> None:
    project = _manage(ctx, principal, path, OWNERS)
    _store_call(ctx.store.remove_member, project.path, username)


# ---------------------------------------------------------------- users (admins)


def list_users(ctx: Context, principal: Principal) -> list[UserView]:
    _require_admin(principal)
    return [UserView(u.username, u.admin, u.blocked, u.created_at) for u in ctx.store.list_users()]


def _hash(ctx: Context, password: object) -> str:
    if not isinstance(password, str) or not password:
        raise Invalid("Give a password.")
    if ctx.hash_password is None:
        from appliance.auth import credentials  # argon2, loaded when a password is set

        hasher = credentials.hash_password
    else:
        hasher = ctx.hash_password
    try:
        return hasher(password)
    except AuthError as error:  # too short
        raise Invalid(str(error)) from None


def create_user(
    ctx: Context, principal: Principal, username: object, password: object, admin: bool = False
) -> UserView:
    _require_admin(principal)
    if not isinstance(username, str):
        raise Invalid("Give the username as a string.")
    _store_call(names.validate_username, username)
    if ctx.store.find_user(username) is not None:
        raise Conflict(f"A user named '{username}' exists already.")
    user = _store_call(ctx.store.create_user, username, _hash(ctx, password), bool(admin))
    return UserView(user.username, user.admin, user.blocked, user.created_at)


def set_blocked(ctx: Context, principal: Principal, username: str, blocked: bool) -> UserView:
    """Blocking refuses every sign-in at once and ends the user's sessions (the
    credentials version changes)."""
    _require_admin(principal)
    if blocked and username == principal.name:
        raise Invalid("You cannot block yourself; ask another administrator.")
    _store_call(ctx.store.set_blocked, username, bool(blocked))
    user = ctx.store.user(username)
    return UserView(user.username, user.admin, user.blocked, user.created_at)


def reset_password(ctx: Context, principal: Principal, username: str, password: object) -> None:
    """Sets a new password: the old one, cached sign-ins and sessions stop working."""
    _require_admin(principal)
    _store_call(ctx.store.user, username)
    _store_call(ctx.store.set_password_hash, username, _hash(ctx, password))


def delete_user(ctx: Context, principal: Principal, username: str) -> None:
    _require_admin(principal)
    if username == principal.name:
        raise Invalid("You cannot delete yourself; ask another administrator.")
    _store_call(ctx.store.delete_user, username)


# ---------------------------------------------------------------- projects (admins)


def create_project(
    ctx: Context,
    principal: Principal,
    path: object,
    visibility: object = "private",
    registry_enabled: bool | None = None,
    owner: str | None = None,
) -> ProjectView:
    """As `appliance-ctl project create`: the default retention policy applies."""
    _require_admin(principal)
    if not isinstance(path, str):
        raise Invalid("Give the project path as a string, like team/app.")
    if visibility not in VISIBILITIES:
        raise Invalid(
            f"'{visibility}' is not a valid visibility; choose one of: {', '.join(VISIBILITIES)}."
        )
    if owner:
        _store_call(ctx.store.user, owner)
    enabled = ctx.default_registry_enabled if registry_enabled is None else bool(registry_enabled)
    project = _store_call(ctx.store.create_project, path, visibility, enabled)
    if owner:
        ctx.store.add_member(project.path, owner, "owner")
    if ctx.default_retention is not None:
        ctx.store.set_retention_policy(project.path, ctx.default_retention)
    return _project_view(ctx, principal, project, None)


def update_project(
    ctx: Context,
    principal: Principal,
    path: str,
    visibility: str | None = None,
    registry_enabled: bool | None = None,
    quota: str | None = None,
) -> ProjectView:
    """Visibility, registry on/off, quota ('none' removes it); checked whole first."""
    _require_admin(principal)
    if visibility is None and registry_enabled is None and quota is None:
        raise Invalid("Nothing to change: give visibility, registry_enabled or quota.")
    if visibility is not None and visibility not in VISIBILITIES:
        raise Invalid(
            f"'{visibility}' is not a valid visibility; choose one of: {', '.join(VISIBILITIES)}."
        )
    quota_bytes = None
    if quota is not None and str(quota).strip().lower() not in ("none", "off"):
        quota_bytes = _store_call(parse_size, str(quota))
    project = _store_call(ctx.store.project, path)
    if visibility is not None or registry_enabled is not None:
        project = ctx.store.update_project(path, visibility, registry_enabled)
    if quota is not None:
        project = ctx.store.set_quota(path, quota_bytes)
    return _project_view(ctx, principal, project, _role(ctx, principal, project))


def delete_project(ctx: Context, principal: Principal, path: str) -> None:
    """Refused while the project holds repositories (as `appliance-ctl project delete`
    without --with-images): delete them first."""
    _require_admin(principal)
    project = _store_call(ctx.store.project, path)
    paths = [p.path for p in ctx.store.list_projects()]
    held = [
        row.name
        for row in ctx.content().repositories(project.path)
        if owning_project(row.name, paths) == project.path
    ]
    if held:
        raise Conflict(
            f"Project {path} still holds {len(held)} repositor"
            f"{'ies' if len(held) != 1 else 'y'} ({', '.join(held[:3])}); delete them first."
        )
    ctx.store.delete_project(project.path)


# ---------------------------------------------------------------- usage


def project_usage(ctx: Context, principal: Principal, path: str) -> dict:
    """The project's bytes now, its quota, and its use over time: one point per recorded
    computation of the figures (appliance-ctl usage, each garbage collection; the history
    beside the figures file), then now (the last figure plus the pushes since)."""
    project, _ = _visible_project(ctx, principal, path)
    figures = ctx.usage_figures()
    used = _used(ctx, project.path)
    history = [list(point) for point in project_history(ctx.usage_history(), project.path)]
    if used is not None and (not history or history[-1][1] != used):
        history.append([ctx.clock(), used])
    return {
        "project": project.path,
        "used_bytes": used,
        "quota_bytes": project.quota_bytes,
        "computed_at": (figures or {}).get("computed_at"),
        "history": history,
    }


def _store_call(fn: Callable, *args: object):  # noqa: ANN202 - passes the callee's result
    """Run a store call, turning its errors into the operation's typed ones."""
    try:
        return fn(*args)
    except NotFoundError as error:
        raise NotFound(str(error)) from None
    except AlreadyExistsError as error:
        raise Conflict(str(error)) from None
    except (InvalidValueError, AuthError, UsageError) as error:
        raise Invalid(str(error)) from None
