"""The `janitor` service: every `janitor.schedule` (shifted per host) the projects'
retention policies (recipes/retention.py), then the garbage collection
(recipes/registry_gc.py), by the program appliance/programs/janitor.py.

Like the renewer it serves nothing (RUNNING is all there is to check) and is told the
config's path; off by default (`janitor.enable`), and off without the bundled registry.
`appliance-ctl status` prints its last and next run under its line (`status_note`).
"""

from __future__ import annotations

from pathlib import Path

from appliance.contracts import RESTART, Service
from appliance.resources import Resource
from appliance.secrets import Secrets
from appliance.settings import Settings
from recipes import supervisor


def janitor_wanted(settings: Settings) -> bool:
    return settings.janitor.enable and settings.registry.enable


def service(settings: Settings) -> Service:
    """The janitor serves nothing: RUNNING is all there is to check."""
    return Service(
        "janitor",
        enabled=janitor_wanted(settings),
        reload=RESTART,
        log=supervisor.service_log(settings, "janitor"),
        status_note=lambda: janitor_status_note(settings.paths.janitor_state),
    )


def resources(settings: Settings, secrets: Secrets) -> list[Resource]:
    if not janitor_wanted(settings):
        return supervisor.disabled(settings, "janitor")
    # As the renewer: told the config's path only when this run read one.
    config = [str(settings.paths.config_file)] if settings.facts.config_file_present else []
    command = [supervisor.executable("python"), "-m", "appliance.programs.janitor", *config]
    return supervisor.program(settings, "janitor", command)


def janitor_status_note(path: Path) -> str | None:
    """`appliance-ctl status`'s line under the janitor: its last run and the next."""
    from appliance import retention
    from appliance.auth.sizes import format_size

    state = retention.read_janitor_state(path)
    parts = []
    last = state.get("last")
    if isinstance(last, dict) and "finished" in last:
        parts.append(
            f"last run {retention.stamp(last['finished'])}: {last.get('result')}, "
            f"{last.get('deleted_tags', 0)} tags deleted, "
            f"{format_size(int(last.get('freed_bytes', 0)))} freed"
        )
    if isinstance(state.get("next"), int | float):
        parts.append(f"next run {retention.stamp(state['next'])}")
    return "; ".join(parts) or None
