"""Immutable and protected tags: the rules of a project, and the decision on one manifest
write (a PUT of a tag, a DELETE of a manifest), as pure functions tested as tables.

A project may have immutable-tag patterns (`^v[0-9]+\\.`: a tag that matches, once it
exists, never points at another manifest, and the manifest it points at cannot be
deleted) and protected-tag patterns with a role (`latest=maintainer`: only that role or
above may push or delete a matching tag). A pattern is a Python regular expression
matched with `re.search`, anywhere in the tag, as `^v[0-9]+\\.` suggests: an unanchored
`latest` also guards `latest-arm64` (a rule that matches too much refuses a push and
names itself; one that matched too little would let a release tag move silently).
Anchor it (`^latest$`) for one exact tag.

The caller gathers the facts (the tag's current digest in the registry, the
reservation of a push in flight, the requester's rank); nothing here touches the
database, the registry or the clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from appliance.auth.permissions import ROLES
from appliance.errors import AuthError

IMMUTABLE, PROTECTED = "immutable", "protected"
ADMIN = "admin"
# Who may push or delete a protected tag: a role of the project, or administrators only.
# guest and reporter may not push at all, so a rule naming them would protect nothing.
PROTECTING_ROLES = ("developer", "maintainer", "owner", ADMIN)
RANKS = {role: rank for rank, role in enumerate((*ROLES, ADMIN))}
DEPLOY_TOKEN_RANK = RANKS["developer"]
"""A deploy token pushes like a developer (write_registry), so it ranks as one."""
PASSED = 460
"""The auth service's answer that sends a manifest write on to the registry (nginx
intercepts it): outside 2xx, which nginx cannot intercept, and answered by nothing else."""
CLEAR = ("", "none")
MAX_PATTERN_LENGTH = 200
MAX_RULES = 20
TAG_MAX_LENGTH = 128
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
RESERVATION_SECONDS = 60
"""How long a push's reservation of an immutable tag keeps other digests out while the
tag is not (yet) in the registry: the push in flight has that long to store its
manifest. A reservation whose manifest never arrived (the PUT failed, the client
vanished) is taken over by the next push after that."""


class InvalidTagRuleError(AuthError):
    """A tag pattern or role the admin gave cannot be used."""

    exit_code = 2


@dataclass(frozen=True)
class TagRule:
    kind: str  # IMMUTABLE or PROTECTED
    pattern: str
    role: str | None = None  # PROTECTED: the least role that may push or delete

    def matches(self, tag: str) -> bool:
        return _compiled(self.pattern).search(tag) is not None

    def __str__(self) -> str:
        return self.pattern if self.role is None else f"{self.pattern}={self.role}"


def _compiled(pattern: str) -> re.Pattern:
    compiled = _CACHE.get(pattern)
    if compiled is None:
        compiled = re.compile(pattern)
        if len(_CACHE) < 1024:
            _CACHE[pattern] = compiled
    return compiled


_CACHE: dict[str, re.Pattern] = {}


def check_pattern(option: str, pattern: str) -> str:
    """The pattern if it compiles, otherwise one sentence naming it and the fix."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidTagRuleError(
            f"{option} '{pattern[:40]}...' is {len(pattern)} characters long; use at most"
            f" {MAX_PATTERN_LENGTH}."
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in pattern):
        raise InvalidTagRuleError(f"{option} {pattern!r} contains control characters.")
    try:
        re.compile(pattern)
    except re.error as error:
        raise InvalidTagRuleError(
            f"{option} '{pattern}' is not a valid regular expression ({error});"
            " tags are matched with Python's re.search, e.g. '^v[0-9]+\\.'."
        ) from error
    return pattern


def parse_immutable(values: Iterable[str]) -> list[TagRule]:
    """`--immutable-tags` values: patterns, or one '' / 'none' for no rule at all."""
    values = list(values)
    if _clears("--immutable-tags", values):
        return []
    _check_count("--immutable-tags", values)
    return [TagRule(IMMUTABLE, check_pattern("--immutable-tags", v)) for v in _unique(values)]


def parse_protected(values: Iterable[str]) -> list[TagRule]:
    """`--protected-tags` values: PATTERN=ROLE (the role after the last '='; tags hold no
    '='), or one '' / 'none' for no rule at all."""
    values = list(values)
    if _clears("--protected-tags", values):
        return []
    _check_count("--protected-tags", values)
    rules = []
    for value in _unique(values):
        pattern, sep, role = value.rpartition("=")
        if not sep or not pattern:
            raise InvalidTagRuleError(
                f"--protected-tags '{value}' is not PATTERN=ROLE, e.g. 'latest=maintainer'."
            )
        if role not in PROTECTING_ROLES:
            raise InvalidTagRuleError(
                f"--protected-tags '{value}': '{role}' is not a role that may push; choose one"
                f" of: {', '.join(PROTECTING_ROLES)}."
            )
        rules.append(TagRule(PROTECTED, check_pattern("--protected-tags", pattern), role))
    return rules


def _clears(option: str, values: list[str]) -> bool:
    if not any(v.strip().lower() in CLEAR for v in values):
        return False
    if len(values) > 1:
        raise InvalidTagRuleError(
            f"{option} '{values[0]}' clears the rules; give it alone, not with other patterns."
        )
    return True


def _check_count(option: str, values: list[str]) -> None:
    if len(values) > MAX_RULES:
        raise InvalidTagRuleError(
            f"{option} was given {len(values)} times; use at most {MAX_RULES}."
        )


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def is_tag(reference: str) -> bool:
    return _TAG.fullmatch(reference) is not None


def is_digest(reference: str) -> bool:
    return _DIGEST.fullmatch(reference) is not None


# -- the decision -----------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""
    """Why not, in the words the client prints ('' when allowed)."""
    reserve: bool = False
    """Allowed as the first push of an immutable tag: the caller records (repository,
    tag, digest) and may allow only if that insert (or take-over) succeeds."""


ALLOW = Verdict(True)


def protection(rules: Iterable[TagRule], tag: str, rank: int) -> TagRule | None:
    """The first protected rule on `tag` whose role is above the requester's rank."""
    for rule in rules:
        if rule.kind == PROTECTED and RANKS[rule.role or ADMIN] > rank and rule.matches(tag):
            return rule
    return None


def immutability(rules: Iterable[TagRule], tag: str) -> TagRule | None:
    for rule in rules:
        if rule.kind == IMMUTABLE and rule.matches(tag):
            return rule
    return None


def guarded(rules: Iterable[TagRule], tag: str) -> TagRule | None:
    """The rule that keeps `tag` from being deleted by anyone below administrators
    (what retention must skip): immutable, or protected at any role."""
    return immutability(rules, tag) or next(
        (r for r in rules if r.kind == PROTECTED and r.matches(tag)), None
    )


def _protected_message(rule: TagRule, tag: str, repository: str, verb: str) -> str:
    who = "administrators" if rule.role == ADMIN else f"the {rule.role} role or above"
    return f"tag {tag} is protected in {repository} (rule '{rule}'): only {who} may {verb} it"


@dataclass(frozen=True)
class Reservation:
    digest: str
    reserved_at: float


def decide_push(
    rules: list[TagRule],
    repository: str,
    tag: str,
    digest: str,
    rank: int,
    current: str | None,
    reservation: Reservation | None,
    now: float,
) -> Verdict:
    """May the manifest `digest` be pushed as `repository:tag`?

    `current` is the digest the tag points at in the registry (None: no such tag);
    `reservation` the last push of this tag that passed here.
    """
    rule = protection(rules, tag, rank)
    if rule is not None:
        return Verdict(False, _protected_message(rule, tag, repository, "push"))
    rule = immutability(rules, tag)
    if rule is None:
        return ALLOW
    if current is not None:
        if current == digest:
            return ALLOW  # the same manifest again: CI stays idempotent
        return Verdict(False, _immutable_message(rule, tag, repository, current))
    if reservation is None or reservation.digest == digest:
        return Verdict(True, reserve=True)
    if now - reservation.reserved_at < RESERVATION_SECONDS:
        return Verdict(
            False,
            f"tag {tag} is immutable in {repository} (rule '{rule}'), and another push of it"
            f" ({reservation.digest}) is in progress; push under a new tag",
        )
    return Verdict(True, reserve=True)  # that push never stored its manifest: take over


def _immutable_message(rule: TagRule, tag: str, repository: str, current: str) -> str:
    return (
        f"tag {tag} is immutable in {repository} (rule '{rule}'): it points at {current};"
        f" push under a new tag"
    )


def decide_delete(
    rules: list[TagRule],
    repository: str,
    reference: str,
    rank: int,
    tags: Mapping[str, tuple[str, ...]],
) -> Verdict:
    """May the manifest `reference` (a digest, or a tag) be deleted?

    `tags` maps the tags that matter (those a rule matches) to the digest each points at
    now, followed by the digests of its platform manifests when it is an image index.
    Deleting a manifest removes every tag on it, and deleting a platform manifest breaks
    the index that lists it, so a digest is refused when an immutable tag, or a tag
    protected above the requester, points at it either way.
    """
    if is_digest(reference):
        on_it = sorted(tag for tag, digests in tags.items() if reference in digests)
    else:
        on_it = [reference] if reference in tags else []
    for tag in on_it:
        rule = protection(rules, tag, rank)
        if rule is not None:
            return Verdict(False, _protected_message(rule, tag, repository, "delete"))
        rule = immutability(rules, tag)
        if rule is not None:
            digest = tags[tag][0]
            what = (
                f"its manifest {digest} cannot be deleted"
                if reference in (tag, digest)
                else f"its image index {digest} lists {reference}, which cannot be deleted"
            )
            return Verdict(False, f"tag {tag} is immutable in {repository} (rule '{rule}'): {what}")
    return ALLOW


def relevant(rules: Iterable[TagRule], tag: str, rank: int) -> bool:
    """Does any rule bear on `tag` for this requester (so its digest must be known)?"""
    return immutability(rules, tag) is not None or protection(rules, tag, rank) is not None
