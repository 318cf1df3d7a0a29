"""Storage usage per project and repository, computed from storage, cached for the auth
service: `appliance-ctl usage`, and `refresh()` after each garbage collection.

Figures are what storage holds, deduplicated the way Distribution stores blobs: a layer
shared by ten repositories is one file and counts once in the total; each project (or
repository) that holds it counts it once too, and shows it as `shared`. Manifests count
as the blobs they are. What no manifest references is `reclaimable` (a garbage
collection frees it). The decisions are `registry_storage.usage` (tested as tables);
this module groups repositories into projects, writes the figures file
(`paths.registry_usage_file`, mode 0644, which the auth service reads for quotas and
metrics) and prints them.

The service adds to a project's figure the blobs pushed since (the registry's events),
so quotas and metrics follow pushes between two computations; see appliance/auth/usage.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from appliance.auth.names import owning_project
from appliance.auth.sizes import format_size
from appliance.auth.store import project_quotas
from appliance.auth.usage import appended_history, history_file, read_history, read_json
from appliance.registry_storage import Content, Storage, read_content, usage
from appliance.resources import atomic_write
from appliance.settings import Settings


def compute(content: Content, projects: Iterable[str], computed_at: float, where: str) -> dict:
    """The figures file's content for a storage snapshot and the project paths."""
    projects = set(projects)

    def project_of(name: str) -> str:
        return owning_project(name, projects)

    by_project = usage(content, project_of)
    by_repository = usage(content, lambda name: name)
    repositories_per_project: dict[str, int] = {}
    for name in content.repositories:
        group = project_of(name)
        repositories_per_project[group] = repositories_per_project.get(group, 0) + 1
    return {
        "computed_at": computed_at,
        "storage": where,
        "total_bytes": by_project.total,
        "referenced_bytes": by_project.referenced,
        "reclaimable_bytes": by_project.total - by_project.referenced,
        "projects": {
            group: {
                "bytes": size,
                "shared_bytes": by_project.shared[group],
                "repositories": repositories_per_project.get(group, 0),
            }
            for group, size in by_project.groups.items()
        },
        "repositories": {
            name: {
                "project": project_of(name),
                "bytes": size,
                "shared_bytes": by_repository.shared[name],
            }
            for name, size in by_repository.groups.items()
        },
    }


def refresh(settings: Settings, storage: Storage) -> dict:
    """Compute the figures from storage and write them for the auth service; returns
    them. Called by `appliance-ctl usage` and after each garbage collection (which
    holds the storage lock: reading needs none, so this takes none).

    `computed_at` is taken before the walk: a push during it is counted again by the
    service's events (an over-estimate until the next computation), never lost."""
    started = time.time()
    figures = compute(
        read_content(storage),
        project_quotas(settings.auth_database),
        started,
        storage.description,
    )
    write(settings.paths.registry_usage_file, figures)
    return figures


def write(path: Path, figures: dict) -> None:
    """Atomically, mode 0644: the auth service's account reads it. Each computation is
    also added to the usage history beside it (the web interface's chart over time)."""
    atomic_write(path, (json.dumps(figures, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    history = history_file(path)
    entries = appended_history(read_history(history), figures)
    atomic_write(history, (json.dumps(entries, separators=(",", ":")) + "\n").encode(), 0o644)


def cached(settings: Settings) -> dict | None:
    return read_json(settings.paths.registry_usage_file)


# ---------------------------------------------------------------- what the admin reads


def report(figures: dict, by: str, quotas: dict[str, int]) -> list[str]:
    """The lines `appliance-ctl usage` prints."""
    if by == "repo":
        rows = [
            (name, format_size(v["bytes"]), format_size(v["shared_bytes"]), v["project"])
            for name, v in sorted(figures["repositories"].items())
        ]
        lines = _table(("REPOSITORY", "SIZE", "SHARED", "PROJECT"), rows)
    else:
        rows = [
            (
                name,
                format_size(v["bytes"]),
                format_size(v["shared_bytes"]),
                str(v["repositories"]),
                format_size(quotas[name]) if name in quotas else "-",
            )
            for name, v in sorted(figures["projects"].items())
        ]
        lines = _table(("PROJECT", "SIZE", "SHARED", "REPOSITORIES", "QUOTA"), rows)
    lines += [
        "",
        f"In storage: {format_size(figures['total_bytes'])} ({figures['total_bytes']} bytes, "
        f"each blob once), {figures['storage']}.",
        f"Reclaimable by garbage collection: {format_size(figures['reclaimable_bytes'])} "
        f"(blobs no manifest references).",
        "SHARED: bytes of blobs another "
        + ("repository" if by == "repo" else "project")
        + " holds too (counted once in the total).",
    ]
    return lines


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    cells = [headers, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
