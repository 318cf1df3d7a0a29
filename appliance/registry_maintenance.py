"""The registry's maintenance window: a small marker file three processes agree on.

`appliance-ctl registry-garbage-collect` writes `<data_dir>/registry-maintenance.json`
(mode 0644) before it hands the registry over to read-only processes and removes it
once they are handed back. Three readers act on it:

- the registry's wrapper (appliance/programs/registry.py) starts its children on the
  read-only config while the window is `open`, and hands itself back to read-write on
  its own when the window's owner is gone (a GC killed with kill -9);
- the token service refuses push and delete while the window is `open` or `closing`,
  with a sentence the client prints (appliance/auth/permissions.py);
- `appliance-ctl reconfigure` removes a stale marker and hands the registry over again.

A window is in force only while the process that opened it lives: its pid and that
process's start time (so a pid reused after a reboot is not mistaken for it). A
marker whose owner is gone is stale, whoever reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

OPEN, CLOSING = "open", "closing"
ABSENT, STALE = "absent", "stale"


@dataclass(frozen=True)
class Window:
    reason: str  # "garbage collection": what the client's sentence names
    started: float  # epoch seconds
    expected_end: float  # epoch seconds: the "until about HH:MM UTC" of the sentence
    pid: int  # the process that opened it and will close it
    pid_start: int | None  # that process's start time (clock ticks since boot)
    # OPEN: the registry must serve read-only. CLOSING: its owner is handing it back to
    # read-write; the token service keeps refusing writes until the marker is gone.
    phase: str = OPEN


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, None when it cannot be read (hidepid, no such pid)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        return int(raw[raw.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def owner_alive(window: Window) -> bool:
    """Does the process that opened the window still run? kill(pid, 0) answers across
    accounts (EPERM: it exists); the start time, when readable, tells a reused pid."""
    try:
        os.kill(window.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if window.pid_start is None:
        return True
    started = process_start(window.pid)
    return started is None or started == window.pid_start


def read(path: Path) -> Window | None:
    """The marker as written, None when there is none (or it cannot be parsed: a marker
    that says nothing readable holds nothing back)."""
    try:
        raw = json.loads(path.read_text())
        return Window(
            reason=str(raw["reason"]),
            started=float(raw["started"]),
            expected_end=float(raw["expected_end"]),
            pid=int(raw["pid"]),
            pid_start=None if raw.get("pid_start") is None else int(raw["pid_start"]),
            phase=str(raw.get("phase", OPEN)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def state(window: Window | None) -> str:
    """ABSENT, STALE (its owner is gone), OPEN or CLOSING."""
    if window is None:
        return ABSENT
    if not owner_alive(window):
        return STALE
    return CLOSING if window.phase == CLOSING else OPEN


def state_of(path: Path) -> str:
    return state(read(path))


def write(path: Path, window: Window) -> None:
    """Written whole under another name and renamed (a reader never sees half of it),
    mode 0644: the registry's and the token service's accounts read it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(asdict(window)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, 0o644)  # whatever the umask
    os.replace(temporary, path)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


class Watch:
    """The marker as a long-running reader sees it, re-parsed only when the file
    changed: one stat per question while there is no window (the token service asks at
    every token request)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._window: Window | None = None

    def window(self) -> Window | None:
        try:
            info = os.stat(self.path)
        except OSError:
            self._key, self._window = None, None
            return None
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        if key != self._key:
            self._key, self._window = key, read(self.path)
        return self._window

    def state(self) -> str:
        return state(self.window())
