"""A supervised service's runtime contract, declared by its recipe as data.

The orchestrator (appliance.pipeline) and the CLI loop over these records and name no
service: how a service reloads, where it is ready, what to wait for after a reload,
which ports it binds and which account must reach its files all come from here. A
service that changes how it reloads (the registry moving from a restart to a graceful
handover on SIGHUP, say) changes its declaration and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# `reload=RESTART`: the service re-reads nothing on a signal, so a reload asked of it
# is a restart (stop, then start).
RESTART = None

# A reload wait: called with the pid about to be signalled, before the signal is sent;
# returns what to wait for once it was sent (nginx: "the old workers stopped taking
# connections"). Raises ServiceError when the reload did not take effect in time.
ReloadWait = Callable[[int], Callable[[], None]]


def signal(name: str) -> str:
    """`reload=signal("HUP")`: the service reloads its files on that signal without
    dropping connections."""
    return name


@dataclass(frozen=True)
class Service:
    """What the orchestrator needs to know to drive one supervised service."""

    name: str
    enabled: bool = True
    reload: str | None = RESTART
    # Where the service answers once it is ready: host:port or a unix socket path; None
    # for a service that serves nothing (the renewer): then RUNNING is all there is.
    ready: str | None = None
    wait_after_reload: ReloadWait | None = None
    # A signal by which the service replaces its own process without dropping requests
    # (a wrapper that hands over to a new process on SIGHUP): a restart asked of it is
    # then that signal plus `wait_after_reload`, instead of a stop and a start.
    graceful_restart: str | None = None
    # Every address it binds -> the setting that chose it: checked for strangers before
    # anything changes ("port 5050 (nginx.http_port) is used by pid 1234 (python3)").
    binds: dict[str, str] = field(default_factory=dict)
    # The account it runs as (None: whoever runs supervisord) and the paths that account
    # must be able to enter, checked before anything starts.
    user: str | None = None
    reaches: tuple[Path, ...] = ()
    log: Path | None = None
    # A pid file the service itself keeps (nginx), so a leftover whose environment the
    # program overwrote (its process title) is still found after its supervisor died.
    pid_file: Path | None = None
    # What `appliance-ctl status` prints under the service's line, read when asked (the
    # janitor: its last and next run); None: nothing more to say.
    status_note: Callable[[], str | None] | None = field(default=None, compare=False)

    @property
    def reloads_by_signal(self) -> bool:
        return self.reload is not RESTART
