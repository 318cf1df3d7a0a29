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
