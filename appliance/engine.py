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

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from appliance.errors import ApplianceError, ResourceError
from appliance.resources import Change, Notify, Resource


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


class Engine:
    def __init__(self, out: Callable[[str], None], dry_run: bool = False,
                 show_diffs: bool = True,
                 before_apply: Callable[[Resource], None] | None = None):
        self.out = out
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
                changes = resource.plan(resource.current())
            except (ApplianceError, OSError) as exc:
                self._fail(report, resource, exc)
                break
            self.out(describe(resource, changes, self.dry_run))
            if changes and self.show_diffs:
                for change in changes:
                    if change.diff:
                        self.out("".join("    " + line for line in
                                         change.diff.splitlines(keepends=True)).rstrip("\n"))
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
        message = str(exc) if isinstance(exc, ApplianceError) else \
            f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or resource.name})"
        self.out(f"! {resource} (failed: {message})")
        report.outcomes.append(Outcome(resource, [], error=message))


def raise_if_failed(report: Report) -> None:
    failed = report.failed
    if failed:
        raise ResourceError(f"{failed.resource} failed: {failed.error}")
