"""The recipes, in the order they converge.

Each module has `resources(settings, secrets)`: the desired state of its service, read
top to bottom, with the service each file notifies declared next to the file. Base
first (accounts, directories, secrets), then supervisord's own config (every service
drops its program file there), then certificates, then the services that read them.
`late_resources` are those that need running services (a Let's Encrypt order needs
nginx to answer the challenge).
"""

from __future__ import annotations

from collections.abc import Iterator

from appliance.engine import Report
from appliance.resources import Resource
from appliance.secrets import Secrets
from appliance.settings import Settings


def modules() -> list:
    from recipes import auth, base, nginx, registry, supervisor, tls

    return [base, supervisor, tls, auth, registry, nginx]


def preflight(settings: Settings) -> None:
    """Checks of things outside appliance.yml (certificate files) before anything changes."""
    from recipes import tls

    tls.preflight(settings)


def resources(settings: Settings, secrets: Secrets) -> Iterator[Resource]:
    for module in modules():
        yield from module.resources(settings, secrets)


def late_resources(settings: Settings, secrets: Secrets) -> Iterator[Resource]:
    for module in modules():
        late = getattr(module, "late_resources", None)
        if late:
            yield from late(settings, secrets)


def messages(settings: Settings, report: Report) -> Iterator[str]:
    """What the admin should read after the summary line (how to log in, say)."""
    for module in modules():
        hook = getattr(module, "messages", None)
        if hook:
            yield from hook(settings, report)
