"""The settings a scheduled program (the renewer, the janitor) reads before each pass.

appliance.yml may be broken or missing for a while (an edit in progress, a deleted
file): the program must not die, nor fill its log with the same sentence. A config that
cannot be used is said once and looked at again at growing intervals; its repair is
said once too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from appliance import settings as settings_module
from appliance.errors import ConfigError
from appliance.settings import Settings

# How soon an unusable appliance.yml is looked at again: doubling from the first to the
# last (a restored file is noticed within the hour; a deleted one costs a stat an hour).
CONFIG_RETRY_FIRST_SECONDS = 60.0
CONFIG_RETRY_MAX_SECONDS = 3600.0


def read_settings(config: Path, named: bool, meanwhile: str, missing_fix: str) -> Settings:
    """This pass's settings, or a ConfigError whose message is the one sentence to log:
    what is wrong, then `meanwhile` (what the program does not do until it is fixed).

    `named`: the config file must exist (reconfigure passed its path); without it, a
    missing file means the embedded defaults, as for appliance-ctl."""
    if named and not config.exists():
        raise ConfigError(
            f"{config} does not exist (deleted since the last reconfigure?), so {meanwhile}"
            f"{missing_fix}."
        )
    try:
        return settings_module.load(config, must_exist=named)
    except ConfigError as exc:
        problems = f" ({'; '.join(exc.problems)})" if exc.problems else ""
        raise ConfigError(
            f"{str(exc).rstrip('.')}{problems}, so {meanwhile} until it is fixed."
        ) from None


class SettingsPoll:
    """Each pass's settings for `program`, waiting (and saying why, once) while they
    cannot be used."""

    def __init__(
        self,
        program: str,
        read: Callable[[], Settings],
        resumed: str,
        say: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.program, self.read, self.resumed = program, read, resumed
        self.say, self.sleep = say, sleep
        self.problem = ""  # the last sentence said about the settings, said once
        self.retry = CONFIG_RETRY_FIRST_SECONDS

    def settings(self) -> Settings:
        while True:
            try:
                settings = self.read()
            except ConfigError as exc:
                if str(exc) != self.problem:
                    self.problem = str(exc)
                    self.say(f"{self.program}: {self.problem}")
                self.sleep(self.retry)
                self.retry = min(self.retry * 2, CONFIG_RETRY_MAX_SECONDS)
                continue
            if self.problem:
                self.say(f"{self.program}: {self.resumed}")
                self.problem, self.retry = "", CONFIG_RETRY_FIRST_SECONDS
            return settings
