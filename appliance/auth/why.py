"""`appliance-ctl why USER ACTION REPO`: the access decision replayed and put in words.

"denied: requested access to the resource is denied" is all a registry client says.
The token service knows why (its audit line's `reason`), but an admin asked at the desk
wants the answer for a user and a repository, not a log search. So this module
rebuilds the asker as the token service would (a user, one of its personal access
tokens, a deploy token, or anonymous), reads the facts the decision uses from the auth
store (admin, blocked, the project owning the repository, its visibility and registry
switch, the asker's role) and asks the service's own decision
(`TokenService.decide_repository`, passed in as `decide`) for the one action. Nothing
here decides: a rule added to the decision (a quota, a maintenance window) shows up in
the answer by itself, as the reason the service gives.

Sentences are built from data (`Explanation`), so the wording is tested as a table and
the CLI only prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.auth.names import is_repository_name
from appliance.auth.permissions import (
    ANONYMOUS,
    ANONYMOUS_PRINCIPAL,
    DEPLOY_TOKEN,
    PERSONAL_TOKEN_SCOPE_ACTIONS,
    ROLE_ACTIONS,
    ROLES,
    USER,
    Decision,
    Principal,
    ProjectAccess,
)
from appliance.auth.sizes import format_size
from appliance.auth.store import Store
from appliance.errors import AuthError

ACTIONS = ("pull", "push", "delete")
ANONYMOUS_NAME = "-"
"""How the command line names an anonymous client: '-' can be no username."""
AUDIT_SCAN_BYTES = 64 * 1024 * 1024
"""How far back in the audit log (and its newest rotated generation) a match is sought."""

Decide = Callable[[Principal, str, list[str]], Decision]


@dataclass(frozen=True)
class Asker:
    """Who asks, as the token service would see them."""

    principal: Principal
    description: str
    """One sentence: 'alice is a user (not an administrator), signing in with a password'."""
    refused_sign_in: str = ""
    """Why the sign-in itself is refused (blocked, revoked or expired token): nothing is
    granted whatever the project says."""
    fix_sign_in: str = ""


@dataclass(frozen=True)
class Explanation:
    who: str  # the name as given ('-' for anonymous)
    action: str
    repository: str
    granted: bool
    reason: str  # why not ('' when granted)
    facts: tuple[str, ...]
    fix: str = ""
    audit: dict | None = None  # the last matching audit record
    audit_line: str = ""

    def headline(self) -> str:
        who = "an anonymous client" if self.who == ANONYMOUS_NAME else self.who
        if self.granted:
            return f"granted: {who} may {self.action} {self.repository}."
        return f"refused: {who} may not {self.action} {self.repository}: {_sentence(self.reason)}"

    def lines(self) -> list[str]:
        out = [self.headline()]
        out += [f"  - {fact}" for fact in self.facts]
        if self.fix:
            out.append(f"  fix: {self.fix}")
        if self.audit is None:
            out.append(
                f"no audit line for {self.who if self.who != ANONYMOUS_NAME else 'anonymous'} "
                f"on {self.repository} (the last {AUDIT_SCAN_BYTES // 2**20} MiB searched)."
            )
        else:
            record = self.audit
            reason = record.get("reason") or ""
            out.append(
                f"last audit line for this user and repository, {record.get('time', '?')}: "
                f"{record.get('result', '?')} (HTTP {record.get('status', '?')})"
                + (f": {reason}" if reason else "")
            )
            out.append(f"  {self.audit_line}")
        return out


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _scopes(scopes: frozenset[str] | None) -> str:
    return ", ".join(sorted(scopes or ())) or "none"


def find_asker(store: Store, who: str, token_id: int | None, now: float) -> Asker:
    """The principal the token service would build for `who` (and its token)."""
    if who == ANONYMOUS_NAME:
        if token_id is not None:
            raise AuthError("An anonymous client has no token; leave out --token.")
        return Asker(ANONYMOUS_PRINCIPAL, "an anonymous client (no sign-in)")
    if "+" in who:  # no username holds '+': the service reads it as a deploy token's
        if token_id is not None:
            raise AuthError(f"{who} is a deploy token; --token names a personal access token.")
        found = store.find_deploy_token(who)
        if found is None:
            raise AuthError(
                f"There is no deploy token signing in as '{who}'; "
                f"appliance-ctl deploy-token list PROJECT shows them."
            )
        token = found[0]
        principal = Principal(
            kind=DEPLOY_TOKEN,
            name=token.username,
            token_scopes=token.scopes,
            project_id=token.project_id,
        )
        description = (
            f"{who} is deploy token {token.id} ({token.name}) of project "
            f"{token.project_path}, scopes {_scopes(token.scopes)}"
        )
        refused = fix = ""
        if not token.usable(now):
            state = "revoked" if token.revoked else "expired"
            refused = f"the deploy token is {state}: every sign-in with it gets 401"
            fix = (
                f"create another: appliance-ctl deploy-token create {token.project_path} "
                f"--name {token.name} --scope {' --scope '.join(sorted(token.scopes))}"
            )
        return Asker(principal, description, refused, fix)
    user = store.find_user(who)
    if user is None:
        raise AuthError(
            f"There is no user named '{who}' (a deploy token signs in as "
            f"appliance+deploy-token-N; '-' is an anonymous client)."
        )
    scopes = None
    via = "signing in with a password"
    refused = fix = ""
    if token_id is not None:
        token = next((t for t in store.list_personal_access_tokens(who) if t.id == token_id), None)
        if token is None:
            raise AuthError(
                f"User '{who}' has no personal access token {token_id}; "
                f"appliance-ctl token list {who} shows them."
            )
        scopes = token.scopes
        via = f"with personal access token {token.id} ({token.name}), scopes {_scopes(scopes)}"
        if not token.usable(now):
            state = "revoked" if token.revoked else "expired"
            refused = f"personal access token {token.id} is {state}: every sign-in with it gets 401"
            fix = f"create another: appliance-ctl token create {who} --name {token.name}"
    if user.blocked:
        refused = f"the account {who} is blocked: every sign-in gets 401"
        fix = f"appliance-ctl user unblock {who}"
    principal = Principal(
        kind=USER, name=user.username, user_id=user.id, admin=user.admin, token_scopes=scopes
    )
    admin = "an administrator" if user.admin else "not an administrator"
    blocked = ", blocked" if user.blocked else ""
    return Asker(principal, f"{who} is a user ({admin}{blocked}), {via}", refused, fix)


def project_fact(repository: str, project: ProjectAccess | None) -> str:
    if project is None:
        return (
            f"no project owns {repository} and {repository.split('/')[0]} is no user's "
            f"namespace: only administrators reach it"
        )
    switch = "registry enabled" if project.registry_enabled else "registry disabled"
    if project.project_id is None:
        return f"{repository} is in {project.path}'s personal namespace (private, {switch})"
    return f"project {project.path} owns {repository} ({project.visibility}, {switch})"


def role_fact(principal: Principal, project: ProjectAccess | None) -> str | None:
    if principal.kind != USER or project is None:
        return None
    if principal.admin:
        return "administrators may pull, push and delete wherever the registry is enabled"
    if project.role is None:
        return f"{principal.name} is not a member of {project.path}"
    actions = ", ".join(a for a in ACTIONS if a in ROLE_ACTIONS.get(project.role, ())) or "nothing"
    if project.project_id is None:
        return f"{principal.name} owns the namespace {project.path} (allows {actions})"
    return f"{principal.name}'s role in {project.path} is {project.role} (allows {actions})"


def least_role(action: str) -> str:
    return next(role for role in ROLES if action in ROLE_ACTIONS[role])


def fix_for(
    asker: Asker, project: ProjectAccess | None, action: str, repository: str, reason: str
) -> str:
    """One command that would grant it, from the facts; '' when the reason is one this
    module does not know (a rule another part added: its reason says what to do)."""
    principal = asker.principal
    if project is None:
        if principal.kind == USER:
            return (
                f"create a project owning it (appliance-ctl project create PATH, PATH a "
                f"prefix of {repository} of at least two components) and add "
                f"{principal.name} as a member, or make {principal.name} an administrator"
            )
        return ""
    if not project.registry_enabled:
        return f"appliance-ctl project update {project.path} --registry"
    if principal.kind == ANONYMOUS:
        if action == "pull":
            return f"sign in, or appliance-ctl project update {project.path} --visibility public"
        return "sign in: anonymous clients may only pull"
    if principal.kind == DEPLOY_TOKEN:
        if action == "delete":
            return "deploy tokens never delete; use a maintainer's personal access token"
        if principal.project_id != project.project_id:
            return f"use a deploy token of {project.path}"
        return (
            f"create a deploy token of {project.path} with --scope write_registry"
            if action == "push"
            else ""
        )
    role_actions = ROLE_ACTIONS.get(project.role or "", frozenset())
    if not principal.admin and action not in role_actions and project.project_id is not None:
        return f"appliance-ctl member add {project.path} {principal.name} {least_role(action)}"
    through = frozenset().union(
        *(PERSONAL_TOKEN_SCOPE_ACTIONS.get(s, frozenset()) for s in principal.token_scopes or ())
    )
    if principal.token_scopes is not None and action not in through:
        return (
            f"use a personal access token with --scope write_registry "
            f"(appliance-ctl token create {principal.name} --name NAME --scope write_registry)"
        )
    return ""


def explain(
    store: Store,
    decide: Decide,
    default_registry_enabled: bool,
    who: str,
    action: str,
    repository: str,
    token_id: int | None,
    audit_log: Path | None,
    now: float,
) -> Explanation:
    if action not in ACTIONS:
        raise AuthError(f"'{action}' is not an action; use pull, push or delete.")
    if not is_repository_name(repository):
        raise AuthError(
            f"'{repository}' is not a repository name the registry accepts (like team/app)."
        )
    asker = find_asker(store, who, token_id, now)
    principal = asker.principal
    project = store.project_access(
        repository,
        principal.user_id,
        principal.name if principal.user_id else None,
        default_registry_enabled,
    )
    facts = [asker.description, project_fact(repository, project)]
    role = role_fact(principal, project)
    if role:
        facts.append(role)
    if project is not None and project.quota_bytes is not None:
        facts.append(
            f"{project.path} has a soft quota of {format_size(project.quota_bytes)} "
            f"(appliance-ctl usage shows what it uses); over it, pushes are refused"
        )
    decision = decide(principal, repository, [action])
    if decision.refusal:
        facts.append(
            "the token request is refused whole (HTTP 401), and the client prints this reason"
        )
    granted = action in decision.granted and not asker.refused_sign_in
    reason = asker.refused_sign_in or ("" if granted else decision.reason or "not allowed")
    if asker.refused_sign_in and action in decision.granted:
        facts.append(f"once it signs in, {action} would be granted")
    fix = ""
    if not granted:
        fix = asker.fix_sign_in or fix_for(asker, project, action, repository, reason)
    audit_name = "" if who == ANONYMOUS_NAME else who
    record, line = last_audit_record(audit_log, audit_name, repository) if audit_log else (None, "")
    return Explanation(who, action, repository, granted, reason, tuple(facts), fix, record, line)


# ---------------------------------------------------------------- the audit log


def last_audit_record(audit_log: Path, user: str, repository: str) -> tuple[dict | None, str]:
    """The newest record of `user` asking for `repository`: in audit.log, else in
    audit.log.1 (the service rotates it itself)."""
    for path in (audit_log, Path(f"{audit_log}.1")):
        for line in _lines_backwards(path):
            if f'"user":{json.dumps(user)}' not in line or repository not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("user") == user and _asks_for(record, repository):
                return record, line
    return None, ""


def _asks_for(record: dict, repository: str) -> bool:
    scopes = record.get("requested") or []
    return any(
        isinstance(scope, str) and scope.rsplit(":", 1)[0] == f"repository:{repository}"
        for scope in scopes
    )


def _lines_backwards(path: Path, chunk: int = 256 * 1024) -> Iterator[str]:
    """The file's lines, last first, read in chunks from the end (an audit log is up
    to logging.max_bytes, 50 MiB by default)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, generator
    except OSError:
        return
    with handle:
        end = handle.seek(0, os.SEEK_END)
        position, rest, read = end, b"", 0
        while position > 0 and read < AUDIT_SCAN_BYTES:
            step = min(chunk, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + rest
            read += step
            lines = data.split(b"\n")
            rest = lines.pop(0)  # may be cut: joined with the chunk before it
            for raw in reversed(lines):
                if raw:
                    yield raw.decode("utf-8", "replace")
        if rest and position == 0:
            yield rest.decode("utf-8", "replace")
