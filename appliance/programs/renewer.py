"""The renewer program: one renewal pass at each of `letsencrypt.runs_per_day` slots.

supervisord runs it as `python -m appliance.programs.renewer [CONFIG]` (CONFIG when the
host has an appliance.yml; a host on the embedded defaults has none). Each pass is a run
of its own: it reads appliance.yml again, so a reconfigure never has to restart the
renewer for it to see new settings, and then `recipes.renewal` (through the pipeline) converges the
certificate. A pass that fails is logged and retried at the next slot, the certificate
in place staying served meanwhile.

The program never exits on its own: an exit would only put it into supervisord's
restart loop (BACKOFF, then FATAL: no renewals at all until someone notices). When
appliance.yml is missing (deleted after the last reconfigure) or cannot be used, it says
so in one sentence and looks again, at growing intervals, until the file is back.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from appliance import pki
from appliance import settings as settings_module
from appliance.certificates import (
    certificate_paths,
    effective_mode,
    read_certificate,
    unusable_pair,
)
from appliance.errors import ApplianceError
from appliance.programs.settings_poll import SettingsPoll, read_settings
from appliance.settings import Settings

# While nginx still serves the placeholder (the first order failed: DNS not there yet,
# port 80 closed), the renewer retries hourly: within Let's Encrypt's limit of 5 failed
# validations per host and hour, and the certificate appears without another reconfigure.
PLACEHOLDER_RUNS_PER_DAY = 24


def renewal_runs_per_day(settings: Settings) -> int:
    """The renewer's schedule: `letsencrypt.runs_per_day`, hourly while no certificate
    from the CA is in place yet."""
    runs = settings.letsencrypt.runs_per_day
    if effective_mode(settings) != "letsencrypt" or not settings.registry_nginx.enable:
        return runs
    cert, key = certificate_paths(settings)
    current = read_certificate(cert, key)
    try:
        waiting = (
            unusable_pair(current) is not None or pki.certificate_info(current.cert_pem).self_signed
        )  # type: ignore[arg-type]
    except pki.CertificateError:
        waiting = True
    return max(runs, PLACEHOLDER_RUNS_PER_DAY) if waiting else runs


def renew_once(settings: Settings, say: Callable[[str], None]) -> None:
    """One pass; whatever goes wrong is said, and the renewer lives on to the next slot."""
    import recipes
    from appliance import pipeline

    try:
        pipeline.execute(settings, recipes.renewal(settings, force=False))
    except ApplianceError as exc:
        say(f"renewer: renewal attempt failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - the renewer must outlive one bad attempt
        say(f"renewer: renewal attempt failed (a bug): {exc!r}")


def renew_forever(
    config: Path,
    named: bool,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> NoReturn:
    """Read the settings, renew if a slot has come, sleep until the next slot; forever.

    `named`: the config file must exist (reconfigure passed its path); without it, a
    missing file means the embedded defaults, as for appliance-ctl.
    """
    slot: datetime | None = None  # the slot slept towards; None before the first
    poll = SettingsPoll(
        "renewer",
        lambda: read_settings(
            config,
            named,
            "no certificate is renewed",
            " until it is back: restore it, or run appliance-ctl reconfigure",
        ),
        f"{config} can be used again; renewals resume.",
        say,
        sleep,
    )
    while True:
        settings = poll.settings()
        if slot is not None and datetime.now(UTC) >= slot:
            renew_once(settings, say)  # also a slot missed while the settings were unusable
        now = datetime.now(UTC)
        slot = pki.next_renewal_run(now, settings.registry_host, renewal_runs_per_day(settings))
        say(f"renewer: next check at {slot:%Y-%m-%d %H:%M:%S} UTC")
        sleep(max(1.0, (slot - now).total_seconds()) + random.random())


def main(argv: list[str]) -> NoReturn:
    if argv:
        config, named = Path(argv[0]), True
    else:
        config, named = settings_module.config_path(None)
    renew_forever(config, named, say=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])
