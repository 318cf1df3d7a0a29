"""The usage figures file (`<data_dir>/registry-usage.json`) and the GC figures file
(`<data_dir>/registry-gc.json`), as the token service reads them.

appliance-ctl computes the figures from storage (appliance/usage.py: it runs as root
and can read any driver's storage; the service's account cannot) and writes them here,
mode 0644. The service adds to a project's figure the blobs pushed into it since
(`usage_pending` in the auth database, fed by the registry's events), so a quota and
the metrics follow pushes without a new computation:

    {"computed_at": 1764336000.0, "storage": "filesystem /var/opt/...",
     "total_bytes": N, "referenced_bytes": N, "reclaimable_bytes": N,
     "projects": {"team/app": {"bytes": N, "shared_bytes": N, "repositories": 3}},
     "repositories": {"team/app/web": {"project": "team/app", "bytes": N, "shared_bytes": N}}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EMPTY: dict = {
    "computed_at": 0.0,
    "storage": "",
    "total_bytes": 0,
    "referenced_bytes": 0,
    "reclaimable_bytes": 0,
    "projects": {},
    "repositories": {},
}


def read_json(path: Path) -> dict | None:
    """A figures file's content; None when it is missing or unreadable (not computed
    yet, or half a file an older writer left: every writer here replaces atomically)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class FiguresFile:
    """One figures file, read again only when it changed (one stat per use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._data: dict | None = None

    def read(self) -> dict | None:
        try:
            status = os.stat(self.path)
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        except OSError:
            self._stamp, self._data = None, None
            return None
        if stamp != self._stamp:
            self._data, self._stamp = read_json(self.path), stamp
        return self._data


HISTORY_KEPT = 400
"""Computations kept in the usage history (the chart's points, oldest dropped first)."""


def history_file(usage_file: Path) -> Path:
    """The usage history beside the figures file: one entry per computation."""
    return Path(usage_file).with_name("registry-usage-history.json")


def read_history(path: Path) -> list[dict]:
    """The recorded computations, oldest first; empty when none was recorded yet."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    return [entry for entry in data if isinstance(entry, dict)] if isinstance(data, list) else []


def history_entry(figures: dict) -> dict:
    """What the history keeps of one computation: when, and each project's bytes."""
    return {
        "at": float(figures.get("computed_at", 0.0)),
        "projects": {
            name: int(values.get("bytes", 0))
            for name, values in (figures.get("projects") or {}).items()
        },
    }


def appended_history(history: list[dict] | None, figures: dict) -> list[dict]:
    """The history with this computation added (one entry per computed_at), bounded."""
    entry = history_entry(figures)
    kept = [h for h in history or () if isinstance(h, dict) and h.get("at") != entry["at"]]
    return [*kept, entry][-HISTORY_KEPT:]


def project_history(history: list[dict] | None, project: str) -> list[tuple[float, int]]:
    """(time, bytes) of one project over the recorded computations, oldest first."""
    points = []
    for entry in history or ():
        if not isinstance(entry, dict):
            continue
        projects = entry.get("projects") or {}
        points.append((float(entry.get("at", 0.0)), int(projects.get(project, 0))))
    return sorted(points)


def project_bytes(figures: dict | None, pending: dict[str, int], project: str) -> int:
    """A project's bytes: the computed figure plus what pushes brought since."""
    computed = ((figures or EMPTY).get("projects") or {}).get(project) or {}
    return int(computed.get("bytes", 0)) + int(pending.get(project, 0))


def current(figures: dict | None, pending: dict[str, int]) -> dict:
    """The figures with the pushes since added: per project, and to the total (an upper
    bound: a pushed blob some other project already holds is counted again until the
    next computation)."""
    base = figures or EMPTY
    projects = {name: dict(values) for name, values in (base.get("projects") or {}).items()}
    for project, added in pending.items():
        entry = projects.setdefault(project, {"bytes": 0, "shared_bytes": 0, "repositories": 0})
        entry["bytes"] = int(entry.get("bytes", 0)) + added
        entry["pushed_since_bytes"] = added
    return {
        **base,
        "projects": projects,
        "total_bytes": int(base.get("total_bytes", 0)) + sum(pending.values()),
    }
