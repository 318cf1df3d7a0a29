"""Who may do what on a repository: one pure decision, tested as a table.

The caller resolves the facts (who is asking, which project owns the repository, the
asker's role there, the project's quota and use); this module turns facts into granted
actions and a reason. Nothing here touches the database or the clock, so every row of
the permission matrix is a plain function call.

Two kinds of "no": a role or token that does not cover an action is a partial grant
(the client then fails with the registry's generic `denied`, the audit log says why); a
condition of the moment that blocks what the role allows (the project is over its
quota) is a `refusal`: the token request itself is refused with the sentence,
which docker and skopeo print. A request that asks to push while pushing is blocked is
refused whole (pull,push: the client came to push); `*` (what `skopeo delete` asks for)
still gets pull and delete.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from appliance.auth.sizes import format_size

PULL, PUSH, DELETE, ALL = "pull", "push", "delete", "*"
REPOSITORY_ACTIONS = frozenset({PULL, PUSH, DELETE})

ROLES = ("guest", "reporter", "developer", "maintainer", "owner")
ROLE_ACTIONS: dict[str, frozenset[str]] = {
    "guest": frozenset(),
    "reporter": frozenset({PULL}),
    "developer": frozenset({PULL, PUSH}),
    "maintainer": REPOSITORY_ACTIONS,
    "owner": REPOSITORY_ACTIONS,
}
VISIBILITIES = ("private", "internal", "public")

READ_REGISTRY, WRITE_REGISTRY, API = "read_registry", "write_registry", "api"
TOKEN_SCOPES = (READ_REGISTRY, WRITE_REGISTRY)
"""A deploy token's scopes."""
PERSONAL_TOKEN_SCOPES = (READ_REGISTRY, WRITE_REGISTRY, API)
"""A personal access token's: `api` admits it to the admin API (appliance/auth/api.py)."""
# What a token scope lets through, on top of what the role allows. write_registry includes
# pull because a push needs it (the client checks which blobs already exist). `api` acts
# with the user's roles, as GitLab's api scope does (the API can delete tags, so a token
# that may use it may also do so through the registry).
PERSONAL_TOKEN_SCOPE_ACTIONS = {
    READ_REGISTRY: frozenset({PULL}),
    WRITE_REGISTRY: REPOSITORY_ACTIONS,
    API: REPOSITORY_ACTIONS,
}
DEPLOY_TOKEN_SCOPE_ACTIONS = {
    READ_REGISTRY: frozenset({PULL}),
    WRITE_REGISTRY: frozenset({PULL, PUSH}),
}

ANONYMOUS, USER, DEPLOY_TOKEN = "anonymous", "user", "deploy_token"


@dataclass(frozen=True)
class Principal:
    """The authenticated asker. Blocked users never become a Principal (they get 401)."""

    kind: str  # ANONYMOUS, USER or DEPLOY_TOKEN
    name: str = ""
    user_id: int | None = None
    admin: bool = False
    token_scopes: frozenset[str] | None = None
    """Scopes of the personal access or deploy token used; None when signed in by password."""
    project_id: int | None = None
    """The one project a deploy token belongs to."""


ANONYMOUS_PRINCIPAL = Principal(kind=ANONYMOUS)


@dataclass(frozen=True)
class ProjectAccess:
    """The project owning a repository, as seen by one principal."""

    path: str
    visibility: str
    registry_enabled: bool
    role: str | None = None
    """The principal's role: its membership, or 'owner' inside its personal namespace."""
    project_id: int | None = None
    """None for a personal namespace without a project row."""
    quota_bytes: int | None = None
    """The project's soft quota; None: no quota."""
    used_bytes: int = 0
    """What the project's repositories hold (appliance.usage's figure plus the blobs
    pushed since); the caller fills it in only for a project with a quota."""


@dataclass(frozen=True)
class Decision:
    granted: tuple[str, ...]
    reason: str
    """Why something asked for was refused ('' when everything asked was granted)."""
    refusal: str = ""
    """When set, the whole token request is refused with this sentence (the status is
    app.REFUSAL_STATUS): what the role allows is blocked at the moment (over quota)."""


def allowed_actions(principal: Principal, project: ProjectAccess | None) -> tuple[frozenset, str]:
    """Everything the principal may do on a repository of `project`, and why not more."""
    if project is None:
        if principal.kind == USER and principal.admin:
            return _limit_by_token(principal, REPOSITORY_ACTIONS), ""
        return frozenset(), "no project owns this repository"
    if not project.registry_enabled:
        return frozenset(), f"the container registry is disabled for project {project.path}"

    baseline: frozenset[str] = frozenset()
    if project.visibility == "public":
        baseline = frozenset({PULL})
    elif project.visibility == "internal" and principal.kind == USER:
        baseline = frozenset({PULL})  # any signed-in user; a deploy token is not a user

    if principal.kind == ANONYMOUS:
        why = "" if baseline else f"project {project.path} is not public; sign in"
        return baseline, why or "anonymous users may only pull"
    if principal.kind == DEPLOY_TOKEN:
        if principal.project_id is None or principal.project_id != project.project_id:
            return baseline, f"this deploy token does not belong to project {project.path}"
        actions = frozenset().union(
            *(DEPLOY_TOKEN_SCOPE_ACTIONS.get(s, frozenset()) for s in principal.token_scopes or ())
        )
        return actions | baseline, f"the deploy token's scopes allow only {_words(actions)}"
    if principal.admin:
        return _limit_by_token(principal, REPOSITORY_ACTIONS) | baseline, _token_reason(principal)
    role_actions = ROLE_ACTIONS.get(project.role or "", frozenset())
    if project.role is None:
        why = f"{principal.name} is not a member of project {project.path}"
    else:
        why = f"role {project.role} in project {project.path} allows only {_words(role_actions)}"
    limited = _limit_by_token(principal, role_actions)
    if limited != role_actions:
        why = _token_reason(principal)
    return limited | baseline, why


def decide(
    principal: Principal, project: ProjectAccess | None, requested: Iterable[str]
) -> Decision:
    """Grant the intersection of what was asked and what is allowed ('*' = all three);
    refuse the request when it asks to push and pushing is blocked (`push_blocked`)."""
    allowed, why = allowed_actions(principal, project)
    asked = _dedupe(requested)
    blocked = push_blocked(project) if PUSH in allowed else ""
    if blocked:
        if PUSH in asked:
            return Decision((), blocked, refusal=blocked)
        allowed = allowed - {PUSH}
        if ALL in asked:  # skopeo delete: pull and delete go on, each granted by name
            asked = [a for a in asked if a != ALL] + [a for a in (PULL, DELETE) if a not in asked]
        granted = grant(asked, allowed)
        return Decision(granted, "" if len(granted) == len(asked) else why or blocked)
    granted = grant(asked, allowed)
    return Decision(granted, "" if len(granted) == len(asked) else why)


def push_blocked(project: ProjectAccess | None) -> str:
    """Why pushing into `project` is blocked at the moment although roles allow it ('' when
    it is not): the project is over its soft quota. Pulls and deletes go on, so an owner
    can make room."""
    if project is None or project.quota_bytes is None:
        return ""
    if project.used_bytes <= project.quota_bytes:
        return ""
    return (
        f"{project.path} uses {format_size(project.used_bytes)} of its "
        f"{format_size(project.quota_bytes)} quota; delete images (then run a garbage "
        f"collection) or ask an administrator to raise the quota"
    )


def grant(requested: Iterable[str], allowed: frozenset[str]) -> tuple[str, ...]:
    granted = []
    for action in _dedupe(requested):
        if action == ALL:
            if REPOSITORY_ACTIONS <= allowed:
                granted.append(ALL)
        elif action in allowed:
            granted.append(action)
    return tuple(granted)


def decide_catalog(principal: Principal, requested: Iterable[str]) -> Decision:
    """`registry:catalog:*` lists every repository: administrators only."""
    if principal.kind == USER and principal.admin:
        return Decision(tuple(a for a in _dedupe(requested) if a == ALL), "")
    return Decision((), "only administrators may list the catalog")


def _limit_by_token(principal: Principal, actions: frozenset[str]) -> frozenset[str]:
    if principal.token_scopes is None:
        return actions
    through = frozenset().union(
        *(PERSONAL_TOKEN_SCOPE_ACTIONS.get(s, frozenset()) for s in principal.token_scopes)
    )
    return actions & through


def _token_reason(principal: Principal) -> str:
    if principal.token_scopes is None:
        return ""
    scopes = ", ".join(sorted(principal.token_scopes)) or "none"
    return f"the personal access token's scopes ({scopes}) do not cover this"


def _words(actions: frozenset[str]) -> str:
    ordered = [a for a in (PULL, PUSH, DELETE) if a in actions]
    return ", ".join(ordered) if ordered else "nothing"


def _dedupe(actions: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for action in actions:
        if action and action not in seen:
            seen.append(action)
    return seen


WRITE_ACTIONS = frozenset({PUSH, DELETE, ALL})


def maintenance_refusal(
    requested: Iterable[str], reason: str | None, until: float, now: float
) -> str:
    """The sentence a push or delete gets while the registry is in maintenance (`reason`
    set: the registry serves read-only); '' for everything else, pulls included.

    The client prints it ("registry is in maintenance (garbage collection) until about
    14:05 UTC; retry later") instead of the read-only registry's bare 405. A window that
    overruns its estimate says a minute from now rather than a time gone by.
    """
    if reason is None or not WRITE_ACTIONS & set(requested):
        return ""
    import time

    end = -(-max(until, now + 60) // 60) * 60  # rounded up to the minute
    return (
        f"registry is in maintenance ({reason}) until about "
        f"{time.strftime('%H:%M', time.gmtime(end))} UTC; retry later"
    )
