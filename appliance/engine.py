"""The converge loop: read, plan, print, apply - and queue what services must do.

Notifications are delayed and de-duplicated: twenty changed files that all notify
`reload nginx` cost one reload, after every file is in place, so a service never
restarts into a half-written configuration. A restart supersedes a reload of the same
service.

When a resource fails, converging stops there and the notifications queued by the
resources that already changed are still handed back to be run: those files are
already on disk, and a service left running on the old version of a file it reads is
the bug class ("certificate changed, nginx never reloaded") we design out. Resources
after the failing one are not touched. A recipe that fails to build its next resource
(a template that does not render) is such a failure too.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from appliance.errors import ApplianceError, ResourceError
from appliance.resources import Change, Notify, Resource
from appliance.settings import sensitive_leaves


@dataclass
class Outcome:
    resource: Resource
    changes: list[Change]
    error: str | None = None


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    notifications: list[Notify] = field(default_factory=list)
    elapsed: float = 0.0
    dry_run: bool = False

    @property
    def updated(self) -> int:
        return sum(1 for o in self.outcomes if o.changes)

    @property
    def failed(self) -> Outcome | None:
        return next((o for o in self.outcomes if o.error), None)


class NextResource(Resource):
    """Stands in for a resource its recipe could not build, so the failure is reported."""

    kind = "next"
    name = "resource"


def queue(notifications: list[Notify], new: Iterable[Notify]) -> list[Notify]:
    """Add `new` to the queue: one entry per service, a restart wins over a reload."""
    result = list(notifications)
    for notify in new:
        same = [i for i, n in enumerate(result) if n.service == notify.service]
        if not same:
            result.append(notify)
        elif notify.action == "restart" and result[same[0]].action != "restart":
            result[same[0]] = notify
    return result


def describe(resource: Resource, changes: list[Change], dry_run: bool) -> str:
    if not changes:
        return f"  {resource} (up to date)"
    verb = "would " if dry_run else ""
    if len(changes) == 1 and changes[0].summary == "create":
        status = f"{verb}create" if dry_run else "created"
    else:
        status = f"{verb}update" if dry_run else "updated"
        status += ": " + ", ".join(c.summary for c in changes)
    return f"+ {resource} ({status})"


MASK = "********"
# A secret this long is masked wherever it appears; a shorter one ("1", "abc") only where
# it is a whole value, so that it cannot turn every 1 of a diff into stars.
MASK_ANYWHERE_LENGTH = 8


class Redactor:
    """Masks known secret values in every line the engine prints or a run log keeps.

    Like Chef's `sensitive true`, but by value rather than per resource: the values come
    from the settings' sensitivity rule (the one show-config masks by) and from the
    generated secrets, so a secret is masked whichever resource's diff carries it (the
    registry config, a supervisor program's environment=, a JSON file) without each
    recipe having to know it holds one.
    """

    def __init__(
        self, values: Iterable[str] = (), is_sensitive: Callable[[str], bool] | None = None
    ):
        self.values = list(values)
        self.is_sensitive = is_sensitive
        found: set[str] = set()
        for value in self.values:
            if not value:
                continue
            # As templates write it too: JSON/YAML-escaped, or with supervisord's %%.
            found |= {value, json.dumps(value)[1:-1], value.replace("%", "%%")}
            # A PEM key spans lines, and a diff shows it a line at a time.
            found |= {
                line.strip()
                for line in value.splitlines()[1:]
                if len(line.strip()) >= MASK_ANYWHERE_LENGTH and "-----" not in line
            }
        found.discard("")
        # Longest first, so a secret that contains another is masked whole.
        self.anywhere = sorted(
            (v for v in found if len(v) >= MASK_ANYWHERE_LENGTH and "\n" not in v),
            key=len,
            reverse=True,
        )
        self.whole = [
            self._whole_value(v)
            for v in sorted(
                (v for v in found if len(v) < MASK_ANYWHERE_LENGTH), key=len, reverse=True
            )
        ]

    @staticmethod
    def _whole_value(value: str) -> tuple[str, re.Pattern, re.Pattern]:
        escaped = re.escape(value)
        # `key: s` or `- s` (YAML, quoted or not) up to the end of the line; "s" or 's'.
        return (
            value,
            re.compile(r"(:\s+|-\s+)([\"']?)" + escaped + r"\2(\s*)$"),
            re.compile(r"([\"'])" + escaped + r"\1"),
        )

    def with_values_in(self, *contents: object) -> Redactor:
        """This redactor plus the values under a sensitive key in these file contents.

        A diff shows the file as it is on disk, which may hold secrets this run no
        longer knows (a storage key the admin just replaced): they are found by the same
        rule, in the two shapes our files hold them, a YAML/JSON document and
        supervisord's `environment = KEY="value",...`.
        """
        if self.is_sensitive is None:
            return self
        found = [
            value
            for content in contents
            if isinstance(content, bytes)
            for value in values_under_sensitive_keys(content, self.is_sensitive)
        ]
        return Redactor([*self.values, *found], self.is_sensitive) if found else self

    def __call__(self, text: str) -> str:
        if not self.anywhere and not self.whole:
            return text
        return "".join(self._line(line) for line in text.splitlines(keepends=True))

    def _line(self, line: str) -> str:
        for value in self.anywhere:
            if value in line:
                line = line.replace(value, MASK)
        for value, yaml_value, quoted in self.whole:
            if value in line:
                line = yaml_value.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", line)
                line = quoted.sub(lambda m: f"{m.group(1)}{MASK}{m.group(1)}", line)
        return line


def values_under_sensitive_keys(content: bytes, is_sensitive: Callable[[str], bool]) -> list[str]:
    found: list[str] = []
    if len(content) > 1024 * 1024:
        return found  # none of our files is this big; a diff of it is not shown whole
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return found
    import yaml  # only a run that prints a diff pays for it

    try:
        found += sensitive_leaves(yaml.safe_load(text), is_sensitive)
    except yaml.YAMLError:
        pass  # not a YAML document (an nginx or supervisord config)
    for line in text.splitlines():
        name, sep, pairs = line.partition("=")
        if sep and name.strip() == "environment":
            from supervisor.datatypes import dict_of_key_value_pairs

            try:
                found += sensitive_leaves(dict_of_key_value_pairs(pairs.strip()), is_sensitive)
            except ValueError:
                pass
    return found


class Engine:
    def __init__(
        self,
        out: Callable[[str], None],
        dry_run: bool = False,
        show_diffs: bool = True,
        redact: Callable[[str], str] | None = None,
        before_apply: Callable[[Resource], None] | None = None,
    ):
        self.redact = redact or Redactor()
        self.raw_out = out
        self.out = lambda line: out(self.redact(line))
        self.dry_run = dry_run
        self.show_diffs = show_diffs
        # Called before a resource changes the host: the pipeline makes the resource's
        # notifications durable there, so a run killed after the change still has them.
        self.before_apply = before_apply

    def converge(self, resources: Iterable[Resource], report: Report | None = None) -> Report:
        report = report or Report()
        started = time.monotonic()
        pending = iter(resources)
        while True:
            try:
                resource = next(pending)
            except StopIteration:
                break
            except (ApplianceError, OSError) as exc:
                self._fail(report, NextResource(), exc)
                break
            try:
                current = resource.current()
                changes = resource.plan(current)
            except (ApplianceError, OSError) as exc:
                self._fail(report, resource, exc)
                break
            self.out(describe(resource, changes, self.dry_run))
            if changes and self.show_diffs:
                redact = self.redact
                if isinstance(redact, Redactor):
                    redact = redact.with_values_in(
                        getattr(current, "content", None), getattr(resource, "content", None)
                    )
                for change in changes:
                    if change.diff:
                        self.raw_out(
                            redact(
                                "".join(
                                    "    " + line for line in change.diff.splitlines(keepends=True)
                                ).rstrip("\n")
                            )
                        )
            if changes and not self.dry_run:
                try:
                    if self.before_apply is not None:
                        self.before_apply(resource)
                    resource.apply()
                except (ApplianceError, OSError) as exc:
                    self._fail(report, resource, exc)
                    break
            report.outcomes.append(Outcome(resource, changes))
            if changes:
                report.notifications = queue(report.notifications, resource.notifies)
        report.elapsed += time.monotonic() - started
        return report

    def _fail(self, report: Report, resource: Resource, exc: Exception) -> None:
        message = (
            str(exc)
            if isinstance(exc, ApplianceError)
            else f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or resource.name})"
        )
        self.out(f"! {resource} (failed: {message})")
        report.outcomes.append(Outcome(resource, [], error=message))


def raise_if_failed(report: Report) -> None:
    failed = report.failed
    if failed:
        raise ResourceError(f"{failed.resource} failed: {failed.error}")
