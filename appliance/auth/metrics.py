"""Prometheus metrics of the auth service, in the text exposition format (0.0.4).

Rendered from what the service reads anyway (the usage figures with the pushes since,
the GC figures file, the registry events it recorded), so every gunicorn worker
answers the same figures: nothing is counted in one worker's memory.
"""

from __future__ import annotations

from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
        number = f"{value:.17g}" if isinstance(value, float) else str(value)
        lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")
    return lines


def render(
    usage: dict,
    quotas: dict[str, int],
    gc: dict | None,
    events: dict[str, int],
) -> bytes:
    """`usage`: appliance.auth.usage.current(); `quotas`: project -> quota bytes;
    `gc`: registry-gc.json's content (None before the first run); `events`: recorded
    registry events per action."""
    projects = usage.get("projects") or {}
    lines: list[str] = []
    lines += _metric(
        "appliance_storage_bytes",
        "gauge",
        "Bytes a project's repositories hold in the registry's storage (each blob once per "
        "project), with the blobs pushed since the figures were computed.",
        [({"project": p}, int(v.get("bytes", 0))) for p, v in sorted(projects.items())],
    )
    lines += _metric(
        "appliance_storage_shared_bytes",
        "gauge",
        "Of a project's bytes, those another project holds too (counted once in the total).",
        [({"project": p}, int(v.get("shared_bytes", 0))) for p, v in sorted(projects.items())],
    )
    lines += _metric(
        "appliance_storage_quota_bytes",
        "gauge",
        "A project's soft quota (projects without a quota are left out).",
        [({"project": p}, q) for p, q in sorted(quotas.items())],
    )
    lines += _metric(
        "appliance_storage_bytes_total",
        "gauge",
        "Bytes in the registry's storage, each blob once (deduplicated), with pushes since.",
        [({}, int(usage.get("total_bytes", 0)))],
    )
    lines += _metric(
        "appliance_storage_reclaimable_bytes",
        "gauge",
        "Bytes of blobs no manifest references: what a garbage collection frees.",
        [({}, int(usage.get("reclaimable_bytes", 0)))],
    )
    lines += _metric(
        "appliance_storage_computed_timestamp_seconds",
        "gauge",
        "When the usage figures were last computed from storage (0: never).",
        [({}, float(usage.get("computed_at", 0.0)))],
    )
    gc = gc or {}
    last = gc.get("last") if isinstance(gc.get("last"), dict) else {}
    lines += _metric(
        "appliance_gc_runs_total", "counter", "Garbage collection runs.", [({}, _int(gc, "runs"))]
    )
    lines += _metric(
        "appliance_gc_freed_bytes_total",
        "counter",
        "Bytes freed by garbage collections.",
        [({}, _int(gc, "freed_bytes_total"))],
    )
    lines += _metric(
        "appliance_gc_freed_blobs_total",
        "counter",
        "Blobs freed by garbage collections.",
        [({}, _int(gc, "freed_blobs_total"))],
    )
    lines += _metric(
        "appliance_gc_last_freed_bytes",
        "gauge",
        "Bytes the last garbage collection freed (or would free, when it was a dry run).",
        [({}, _int(last, "freed_bytes"))],
    )
    lines += _metric(
        "appliance_gc_last_dry_run",
        "gauge",
        "1 when the last garbage collection was a dry run.",
        [({}, 1 if last.get("dry_run") else 0)],
    )
    lines += _metric(
        "appliance_gc_last_finished_timestamp_seconds",
        "gauge",
        "When the last garbage collection finished (0: never).",
        [({}, float(last.get("finished") or 0))],
    )
    lines += _metric(
        "appliance_registry_events_recorded",
        "gauge",
        "Manifest events held in the push and pull history, per action (bounded per "
        "repository, so this is not a counter).",
        [({"action": a}, n) for a, n in sorted(events.items())],
    )
    return ("\n".join(lines) + "\n").encode()


def _int(mapping: dict, key: str) -> int:
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
