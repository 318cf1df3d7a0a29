"""Settings for the pure recipe tests: loaded exactly as reconfigure loads them, under a
root of the test's choosing, with placeholder secrets (recipes only copy them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from appliance.secrets import Secrets
from appliance.settings import Settings, load

SECRETS = Secrets(
    "KEY", "CERT", "http-secret", "auth-secret", "ACCOUNT", registry_events_secret="events-secret"
)


def settings_for(root: Path, run_as_root: bool = False, **overrides: object) -> Settings:
    """`root`'s appliance.yml (or the defaults) with `overrides`; run_as_root decides
    whether the recipes hand files to the service accounts."""
    settings = load(
        root / "etc/appliance/appliance.yml", overrides={"root": str(root), **overrides}
    )
    return dataclasses.replace(
        settings, facts=dataclasses.replace(settings.facts, run_as_root=run_as_root)
    )
