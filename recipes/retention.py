"""`appliance-ctl retention run [PATH] [--dry-run]`: the projects' retention policies (the
`janitor` service, recipes/janitor.py, runs them on a schedule).

The run goes through the one pipeline (its lock, its log under `<log_dir>/retention/`,
secrets masked): one resource per project with a policy, whose plan is the tags the
policy deletes, each with why (appliance/retention.py decides; this module gathers the
facts: the registry's tags from one storage snapshot, the push and pull history and
the tag rules from the auth database). The diff lines are the same in a `--dry-run` and
in the real run, so the preview is what happens. Deleting is `tag delete`'s
(appliance/registry_content.py): another tag on the same digest keeps its manifest, an
index goes with the platform manifests no remaining tag reaches. The caller holds the
storage lock (no garbage collection or other delete meanwhile). Nothing is freed on
disk: the next garbage collection frees the blobs.

A project whose policy would delete more than its `--max-delete` deletes nothing: it
gets no resource, and the run's end names it with the tags it would have deleted (the
CLI exits 1).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from appliance.engine import Report
from appliance.errors import UsageError
from appliance.pipeline import Run
from appliance.resources import Change, Resource
from appliance.secrets import Secrets
from appliance.settings import Settings

if TYPE_CHECKING:
    from appliance import retention
    from appliance.registry_content import RegistryContent
    from appliance.registry_storage import Content

LOG_NAME = "retention"


@dataclass
class Retention:
    """What the run's resources share: one storage snapshot, one `now`, the results."""

    settings: Settings
    content: RegistryContent
    now: float = field(default_factory=time.time)
    _snapshot: Content | None = None
    plans: dict[str, retention.ProjectPlan] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)  # what each deletion did (tag delete's lines)
    deleted: int = 0

    def snapshot(self) -> Content:
        if self._snapshot is None:
            self._snapshot = self.content.snapshot()
        return self._snapshot

    @property
    def refusals(self) -> list[str]:
        return [plan.refusal() for plan in self.plans.values() if plan.over_limit]


def policies(settings: Settings, path: str | None) -> dict[str, retention.Policy]:
    """The policies this run applies: every project's, or PATH's alone (which must have one)."""
    from appliance.auth.store import admin_store, check_schema

    check_schema(settings.auth_database)  # missing or old: one sentence naming reconfigure
    with admin_store(settings.auth_database) as store:
        found = store.retention_policies()
        if path is not None:
            store.project(path)  # an unknown project is one sentence
            if path not in found:
                raise UsageError(
                    f"Project {path} has no retention policy; set one with appliance-ctl "
                    f"project retention {path} --keep-last N --older-than AGE."
                )
            return {path: found[path]}
        return found


def project_plan(state: Retention, project: str, policy: retention.Policy) -> retention.ProjectPlan:
    """Every tag of the project's repositories with its verdict (the facts read here)."""
    from appliance import retention
    from appliance.auth.store import HISTORY_KEPT, admin_store
    from appliance.auth.tag_rules import guarded
    from appliance.registry_content import owning_project

    content = state.snapshot()
    with admin_store(state.settings.auth_database) as store:
        paths = [p.path for p in store.list_projects()]
        rules = store.tag_rules(store.project(project).id)
        plan = retention.ProjectPlan(project, policy)
        for name in sorted(content.repositories):
            if owning_project(name, paths) != project:
                continue
            repository = content.repositories[name]
            children = {}
            for digest in set(repository.tags.values()):
                manifest = content.manifest(digest)
                if manifest is not None and manifest.is_index:
                    children[digest] = [child.digest for child in manifest.children]
            guard = {}
            for tag in repository.tags:
                rule = guarded(rules, tag)
                if rule is not None:
                    guard[tag] = f"{rule.kind} '{rule}'"
            events = [
                retention.Event(e.action, e.tag, e.digest, e.actor, e.at)
                for e in store.tag_events(name)
            ]
            pulls = [e.at for e in events if e.action == "pull"]
            known_since = min(pulls) if len(pulls) >= HISTORY_KEPT else None  # bounded
            facts = retention.tag_facts(name, repository.tags, events, children, guard)
            plan.verdicts += retention.select(policy, facts, state.now, known_since)
        return plan


@dataclass
class ProjectRetention(Resource):
    """One project's policy applied: the tags it deletes are the plan."""

    state: Retention
    project: str
    policy: retention.Policy
    kind: ClassVar[str] = "retention of"

    @property
    def name(self) -> str:
        return self.project

    def current(self) -> retention.ProjectPlan:
        return self.state.plans[self.project]

    def plan(self, current: retention.ProjectPlan) -> list[Change]:
        if not current.deletions:
            return []
        count = len(current.deletions)
        return [
            Change(
                f"delete {count} tag{'s' if count != 1 else ''}",
                "\n".join(v.line(self.state.now) for v in current.deletions),
            )
        ]

    def apply(self) -> None:
        plan = self.state.plans[self.project]
        expected = {(v.facts.repository, v.facts.tag): v.facts.digest for v in plan.deletions}
        done, skipped = self.state.content.delete_unchanged_tags(expected)
        self.state.done += done.lines()
        self.state.done += [
            f"{name}:{tag} skipped: pushed again or deleted since the plan was made"
            for name, tag in skipped
        ]
        self.state.deleted += len(done.removals)


def run(
    settings: Settings, path: str | None = None, dry_run: bool = False, verbose: bool = False
) -> tuple[Run, Retention]:
    """The retention run (executed by appliance.pipeline) and its state, whose
    `refusals` the caller turns into an exit status. `verbose`: every kept tag too,
    with the rule that keeps it."""
    import recipes
    from appliance import secrets as secrets_module

    state = Retention(settings, recipes.registry_content(settings))

    def resources(secrets: Secrets) -> Iterator[Resource]:
        """A project --max-delete stops gets no resource: nothing of it can change (its
        refusal and the tags it would have deleted are the run's messages)."""
        for project, policy in policies(settings, path).items():
            plan = state.plans[project] = project_plan(state, project, policy)
            if not plan.over_limit:
                yield ProjectRetention(state, project, policy)

    def intro() -> list[str]:
        return [
            f"retention{' (dry run)' if dry_run else ''}: tags the policies delete, as of "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(state.now))} UTC"
        ]

    def summary(report: Report, elapsed: float) -> str:
        name = "retention"
        if report.failed:
            return f"{name}: failed after {elapsed:.1f} s"
        planned = sum(len(p.deletions) for p in state.plans.values() if not p.over_limit)
        projects = len(state.plans)
        where = f"{projects} project{'s' if projects != 1 else ''} with a policy"
        if dry_run:
            return f"{name} (dry run): would delete {planned} tags in {where}; nothing was changed"
        note = "; the next garbage collection frees their bytes" if state.deleted else ""
        return f"{name}: deleted {state.deleted} tags in {where} in {elapsed:.1f} s{note}"

    def messages(report: Report) -> Iterator[str]:
        for line in state.done:
            yield f"  {line}"
        if verbose:
            for plan in state.plans.values():
                for verdict in plan.verdicts:
                    if not verdict.delete:
                        yield f"  {verdict.line(state.now)}"
        for plan in state.plans.values():
            if plan.over_limit:
                yield f"  {plan.refusal()}"
                for verdict in plan.deletions:
                    yield f"    (not deleted) {verdict.line(state.now)}"

    def preflight() -> None:
        if not settings.registry.enable:
            raise UsageError(
                "the bundled registry is disabled (registry.enable: false); apply retention "
                "where the registry runs."
            )
        if not dry_run:
            state.content.check_deletes()

    return (
        Run(
            name="retention",
            log_name=LOG_NAME,
            resources=resources,
            services=recipes.services(settings),
            secrets=lambda: secrets_module.for_settings(settings),
            preflight=preflight,
            intro=intro,
            summary=summary,
            messages=messages,
            start_services=False,
            check_every_service=False,
        ),
        state,
    )
