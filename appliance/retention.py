"""Retention policies: which tags of a repository a project's policy deletes, and why.

A policy keeps a tag when any of its keep rules holds; a tag is deleted only when none
does:

- `keep_last N`: the tag is among the repository's N newest by push time;
- `keep` patterns (re.search, like the tag rules): the tag matches one;
- `older_than`: the tag was pushed less than that long ago (no value: any age is old);
- `pulled_within`: the tag (or its digest, or a platform manifest of its index) was
  pulled less than that long ago;
- always: a tag an immutable or protected rule guards (appliance.auth.tag_rules), and a
  tag with no push in the history (pushed before the history was recorded, or pushed
  more than a thousand pushes ago): its age is unknown, and an image's own `created`
  date says nothing about when it was pushed (reproducible builds write 1970).

A tag is the unit: a multi-arch index is one tag (its platform manifests are neither
counted nor deleted on their own; deleting the index's last tag deletes them with it,
as `tag delete` does), and deleting one of two tags on a digest only unlinks that tag.

Everything here is pure: the caller reads the tags, the history and the rules; the
decision (`select`) is a function of them and of `now`, tested as tables.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import UsageError

_AGE = re.compile(r"([0-9]+)\s*([smhdw])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_PATTERNS = 20
MAX_PATTERN_LENGTH = 200


def parse_age(option: str, text: str) -> int:
    """'30d' -> seconds; anything else is one sentence naming the option."""
    match = _AGE.fullmatch(str(text).strip().lower())
    if not match or int(match.group(1)) == 0:
        raise UsageError(
            f"{option} {text!r} is not an age; give a number and a unit (s, m, h, d or w), "
            f"like 30d or 12h."
        )
    return int(match.group(1)) * UNITS[match.group(2)]


def format_age(seconds: float) -> str:
    """The largest whole unit: 2592000 -> '30d', 90 -> '90s', 5400 -> '90m'."""
    seconds = int(seconds)
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % UNITS[unit] == 0:
            return f"{seconds // UNITS[unit]}{unit}"
    return f"{seconds}s"


def ago(seconds: float) -> str:
    """A rounded age for a sentence: '3d', '5h', '40s'."""
    seconds = max(0, int(seconds))
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit]:
            return f"{seconds // UNITS[unit]}{unit}"
    return f"{seconds}s"


def check_pattern(option: str, pattern: str) -> str:
    if len(pattern) > MAX_PATTERN_LENGTH or any(ord(c) < 32 or ord(c) == 127 for c in pattern):
        raise UsageError(
            f"{option} {pattern[:40]!r} is too long or holds control characters; use at most "
            f"{MAX_PATTERN_LENGTH} printable characters."
        )
    try:
        re.compile(pattern)
    except re.error as error:
        raise UsageError(
            f"{option} {pattern!r} is not a valid regular expression ({error}); tags are "
            f"matched with Python's re.search, e.g. '^v[0-9]'."
        ) from error
    return pattern


@dataclass(frozen=True)
class Policy:
    """A project's retention policy (ages in seconds; None: the rule is not used)."""

    keep_last: int | None = None
    keep: tuple[str, ...] = ()
    older_than: int | None = None
    pulled_within: int | None = None
    max_delete: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is None and self.older_than is None:
            raise UsageError(
                "A retention policy needs --keep-last N or --older-than AGE (or both): "
                "without either it would delete every tag no pattern keeps."
            )
        for name in ("keep_last", "max_delete"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise UsageError(
                    f"--{name.replace('_', '-')} {value!r} is not a whole number (0 or more)."
                )
        if len(self.keep) > MAX_PATTERNS:
            raise UsageError(
                f"--keep was given {len(self.keep)} times; use at most {MAX_PATTERNS}."
            )
        for pattern in self.keep:
            check_pattern("--keep", pattern)

    def describe(self) -> str:
        """One sentence, as `--show` and every run print it."""
        keeps = []
        if self.keep_last is not None:
            keeps.append(f"the newest {self.keep_last} per repository")
        if self.keep:
            keeps.append("tags matching " + " or ".join(f"'{p}'" for p in self.keep))
        if self.older_than is not None:
            keeps.append(f"tags pushed within {format_age(self.older_than)}")
        if self.pulled_within is not None:
            keeps.append(f"tags pulled within {format_age(self.pulled_within)}")
        limit = (
            f"; a run that would delete more than {self.max_delete} deletes nothing"
            if self.max_delete is not None
            else ""
        )
        return f"keeps {', '.join(keeps)}; deletes the other tags{limit}"

    def to_json(self) -> dict:
        return {
            "keep_last": self.keep_last,
            "keep": list(self.keep),
            "older_than": None if self.older_than is None else format_age(self.older_than),
            "pulled_within": None if self.pulled_within is None else format_age(self.pulled_within),
            "max_delete": self.max_delete,
        }


def policy_from_options(
    keep_last: int | None,
    keep: Iterable[str] | None,
    older_than: str | None,
    pulled_within: str | None,
    max_delete: int | None,
) -> Policy:
    """The policy the command line (or appliance.yml's default) states, checked whole."""
    return Policy(
        keep_last=keep_last,
        keep=tuple(dict.fromkeys(keep or ())),
        older_than=None if older_than is None else parse_age("--older-than", older_than),
        pulled_within=None
        if pulled_within is None
        else parse_age("--pulled-within", pulled_within),
        max_delete=max_delete,
    )


# ---------------------------------------------------------------- the facts of a tag


@dataclass(frozen=True)
class Event:
    """A push or pull from the history, as far as retention reads it."""

    action: str
    tag: str | None
    digest: str | None
    actor: str | None
    at: float


@dataclass(frozen=True)
class TagFacts:
    repository: str
    tag: str
    digest: str
    pushed_at: float | None = None
    pushed_by: str | None = None
    last_pulled: float | None = None
    guarded_by: str | None = None  # the immutable or protected rule that guards it


def tag_facts(
    repository: str,
    tags: Mapping[str, str],
    events: Iterable[Event],
    children: Mapping[str, Iterable[str]] | None = None,
    guard: Mapping[str, str] | None = None,
) -> list[TagFacts]:
    """Each tag with its last push (of its current digest under that tag), pusher and
    last pull: a pull of the tag, of its digest (a pull by digest names no tag) or of a
    platform manifest of its index (clients pull the index by tag, then a platform by
    digest). `children`: an index's platform digests; `guard`: tag -> the rule text."""
    children = children or {}
    guard = guard or {}
    pushes: dict[tuple[str, str], Event] = {}
    pulled_tag: dict[str, float] = {}
    pulled_digest: dict[str, float] = {}
    for event in events:
        if event.action == "push" and event.tag and event.digest:
            key = (event.tag, event.digest)
            if key not in pushes or event.at >= pushes[key].at:
                pushes[key] = event
        elif event.action == "pull":
            if event.tag:
                pulled_tag[event.tag] = max(pulled_tag.get(event.tag, 0.0), event.at)
            if event.digest:
                pulled_digest[event.digest] = max(pulled_digest.get(event.digest, 0.0), event.at)
    facts = []
    for tag, digest in sorted(tags.items()):
        push = pushes.get((tag, digest))
        pulls = [pulled_tag.get(tag), pulled_digest.get(digest)]
        pulls += [pulled_digest.get(child) for child in children.get(digest, ())]
        known = [p for p in pulls if p]
        facts.append(
            TagFacts(
                repository,
                tag,
                digest,
                pushed_at=push.at if push else None,
                pushed_by=push.actor if push else None,
                last_pulled=max(known) if known else None,
                guarded_by=guard.get(tag),
            )
        )
    return facts


# ---------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Verdict:
    facts: TagFacts
    delete: bool
    reason: str  # deleted: what made it old; kept: the first keep rule that holds

    def line(self, now: float) -> str:
        """'team/app:ci-3  pushed 40d ago by ci, never pulled: <reason>'"""
        f = self.facts
        pushed = (
            f"pushed {ago(now - f.pushed_at)} ago by {f.pushed_by or '(anonymous)'}"
            if f.pushed_at is not None
            else "no push recorded"
        )
        pulled = f"last pulled {ago(now - f.last_pulled)} ago" if f.last_pulled else "never pulled"
        return f"{f.repository}:{f.tag}  {pushed}, {pulled}: {self.reason}"


def select(
    policy: Policy, tags: Iterable[TagFacts], now: float, pulls_known_since: float | None = None
) -> list[Verdict]:
    """Every tag of one repository with its verdict, in tag order. Deleted: no keep
    rule holds (see the module's docstring). `pulls_known_since`: when the repository's
    pull history is bounded (the last 1,000 pulls are kept), the time of its oldest pull;
    a tag not seen pulled since is kept when that is within --pulled-within (it may have
    been pulled before, in what the history no longer holds)."""
    tags = sorted(tags, key=lambda f: f.tag)
    dated = sorted(
        (f for f in tags if f.pushed_at is not None),
        key=lambda f: (f.pushed_at, f.tag),
        reverse=True,
    )
    newest = {f.tag for f in dated[: policy.keep_last or 0]}
    patterns = [re.compile(p) for p in policy.keep]
    verdicts = []
    for f in tags:
        kept = _kept_because(policy, f, newest, patterns, now, pulls_known_since)
        if kept:
            verdicts.append(Verdict(f, False, kept))
            continue
        why = []
        if policy.keep_last is not None:
            why.append(f"not among the newest {policy.keep_last}")
        if patterns:
            why.append("matches no --keep pattern")
        if policy.older_than is not None:
            why.append(f"older than {format_age(policy.older_than)}")
        if policy.pulled_within is not None:
            why.append(f"not pulled within {format_age(policy.pulled_within)}")
        verdicts.append(Verdict(f, True, ", ".join(why)))
    return verdicts


def _kept_because(
    policy: Policy,
    f: TagFacts,
    newest: set[str],
    patterns: list[re.Pattern],
    now: float,
    pulls_known_since: float | None,
) -> str:
    if f.guarded_by:
        return f"kept: guarded by the tag rule {f.guarded_by}"
    if f.pushed_at is None:
        return "kept: no push in the history (age unknown)"
    if f.tag in newest:
        return f"kept: among the newest {policy.keep_last}"
    matching = next((p.pattern for p in patterns if p.search(f.tag)), None)
    if matching is not None:
        return f"kept: matches --keep '{matching}'"
    if policy.older_than is not None and now - f.pushed_at < policy.older_than:
        return f"kept: pushed within {format_age(policy.older_than)}"
    if (
        policy.pulled_within is not None
        and f.last_pulled is not None
        and now - f.last_pulled < policy.pulled_within
    ):
        return f"kept: pulled within {format_age(policy.pulled_within)}"
    if (
        policy.pulled_within is not None
        and pulls_known_since is not None
        and now - pulls_known_since < policy.pulled_within
    ):
        return (
            f"kept: the pull history reaches back only {ago(now - pulls_known_since)} "
            f"(it keeps the last pulls only), less than --pulled-within "
            f"{format_age(policy.pulled_within)}"
        )
    return ""


@dataclass
class ProjectPlan:
    """What one project's policy deletes in this run, over its repositories."""

    project: str
    policy: Policy
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def deletions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.delete]

    @property
    def over_limit(self) -> bool:
        """--max-delete: a run that would delete more deletes nothing in the project."""
        limit = self.policy.max_delete
        return limit is not None and len(self.deletions) > limit

    def refusal(self) -> str:
        return (
            f"{self.project}: the policy would delete {len(self.deletions)} tags, more than "
            f"--max-delete {self.policy.max_delete}; nothing was deleted in {self.project} "
            f"(if these are right: appliance-ctl project retention {self.project} "
            f"--max-delete {len(self.deletions)} ..., with the policy's other options)"
        )


# ---------------------------------------------------------------- the janitor's schedule


def next_run(now: float, host: str, period: int) -> float:
    """The janitor's next start: every `period` seconds, at an offset inside the period
    that a hash of the host name fixes. Like the renewer's slots, many hosts spread over
    the period instead of all collecting at midnight, and a restart neither skips nor
    repeats a run (a random sleep would do both)."""
    import hashlib

    if period < 1:
        raise ValueError("period must be at least 1 second")
    digest = hashlib.sha256(host.lower().encode()).digest()
    offset = int(period * (int.from_bytes(digest[:8], "big") / 2**64))
    run = (int(now) - offset) // period * period + offset
    while run <= now:
        run += period
    return float(run)


def stamp(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def read_janitor_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
