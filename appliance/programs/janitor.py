"""The janitor program: the projects' retention policies, then the garbage collection,
every `janitor.schedule` (at an offset inside the period fixed per host).

supervisord runs it as `python -m appliance.programs.janitor [CONFIG]` when
`janitor.enable` is true. Like the renewer (appliance/programs/renewer.py) each run reads
appliance.yml again, goes through the one pipeline (`recipes.retention_run`, then
`recipes.garbage_collection`: their logs land under `<log_dir>/retention/` and
`<log_dir>/gc/`), holds the storage lock while it changes the storage, and never ends
the program: a failed run is said in one line and the next period tries again. Its
own log (`<log_dir>/janitor/current`) gets every line the runs print, and
`<data_dir>/janitor.json` the last run and the next, which `appliance-ctl status` shows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from appliance import registry_gc, retention
from appliance import settings as settings_module
from appliance.errors import ApplianceError
from appliance.programs.settings_poll import SettingsPoll, read_settings
from appliance.registry_storage import storage_lock
from appliance.settings import Settings


def run_once(settings: Settings, say: Callable[[str], None]) -> dict:
    """Retention, then the collection (which runs even when retention failed: it frees
    what earlier deletes left); what happened, as janitor.json's `last` keeps it."""
    import recipes
    from appliance import pipeline

    started = time.time()
    last: dict = {"started": int(started), "deleted_tags": 0, "freed_bytes": 0}
    problems: list[str] = []
    lock = settings.paths.registry_storage_lock
    say(f"janitor: run started at {retention.stamp(started)}")

    def step(what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except ApplianceError as exc:
            problems.append(f"{what} failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - the janitor must outlive one bad run
            problems.append(f"{what} failed (a bug): {exc!r}")

    def apply_retention() -> None:
        run, state = recipes.retention_run(settings)
        with storage_lock(lock, "the janitor's retention run"):
            pipeline.execute(settings, run)
        last["deleted_tags"] = state.deleted
        for line in state.refusals:
            say(f"janitor: {line}")
        if state.refusals:
            problems.append(f"{len(state.refusals)} project(s) stopped by --max-delete")

    def collect() -> None:
        with storage_lock(lock, "the janitor's garbage collection"):
            pipeline.execute(settings, recipes.garbage_collection(settings))
        stats = registry_gc.read_stats(settings.paths.registry_gc_file).get("last") or {}
        if stats.get("started", 0) >= int(started):
            last["freed_bytes"] = int(stats.get("freed_bytes", 0))

    if settings.auth.enable:
        step("retention", apply_retention)
    else:
        say("janitor: no token service here (auth.enable: false), so no retention policies")
    if settings.janitor.garbage_collect:
        step("garbage collection", collect)
    last["result"] = "; ".join(problems) or "ok"
    last["finished"] = int(time.time())
    say(
        f"janitor: run finished: {last['result']}; {last['deleted_tags']} tags deleted, "
        f"{registry_gc.human(last['freed_bytes'])} freed"
    )
    return last


def write_state(path: Path, state: dict) -> None:
    """janitor.json, whole or not at all (0644: `appliance-ctl status` reads it)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except OSError:
        pass  # a full disk: the run happened all the same, and its logs say so


def janitor_forever(
    config: Path,
    named: bool,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> NoReturn:
    """Read the settings, run if the slot has come, sleep until the next slot; forever.
    The first slot is waited for (a restart neither repeats nor skips a run); a config
    that cannot be used is said once and looked at again at growing intervals."""
    slot: float | None = None
    last: dict | None = None  # read once the settings say where
    poll = SettingsPoll(
        "janitor",
        lambda: read_settings(config, named, "the janitor waits", " until it is fixed"),
        f"{config} can be used again; runs resume.",
        say,
        sleep,
    )
    while True:
        settings = poll.settings()
        period = retention.parse_age("janitor.schedule", settings.janitor.schedule)
        if last is None:  # the previous process's last run, until this one has run
            last = retention.read_janitor_state(settings.paths.janitor_state).get("last") or {}
        if slot is not None and clock() >= slot:
            if settings.janitor.enable:
                last = run_once(settings, say)
            else:  # turned off in the file, not yet reconfigured: already off
                say("janitor: janitor.enable is false in appliance.yml: no run")
        slot = retention.next_run(clock(), settings.registry_host, period)
        write_state(settings.paths.janitor_state, {"last": last, "next": int(slot)})
        say(f"janitor: next run at {retention.stamp(slot)}")
        sleep(max(0.5, slot - clock()))


def main(argv: list[str]) -> NoReturn:
    if argv:
        config, named = Path(argv[0]), True
    else:
        config, named = settings_module.config_path(None)
    janitor_forever(config, named, say=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])
