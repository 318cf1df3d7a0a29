"""Garbage collection of the registry's storage: the plan, Distribution's own collector
run safely, and the figures it leaves behind.

The collector is Debian's `docker-registry garbage-collect CONFIG`, plain: never `-m`
(`--delete-untagged`), which deletes the platform manifests of a multi-platform index
in Distribution 2.8 (distribution#3004; DESIGN.md). It marks every manifest revision of
every repository and what each references (configs, layers, an index's children) and
deletes every other blob. `unreferenced` is that mark, computed from a `Content`
snapshot, so `--dry-run` can say what a run would free without touching storage.

The collector must not run while anything writes (a blob it found unreferenced could be
referenced by a manifest pushed a moment later): it runs inside a maintenance window
(appliance.registry_maintenance), and `run_collector` kills it the moment the registry's
wrapper reports a child that is not read-only.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.registry_storage import (
    V2,
    Content,
    Manifest,
    Storage,
    StorageError,
    blob_path,
    parse_manifest,
)
from appliance.resources import atomic_write

PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 0.05


class CollectionError(ApplianceError):
    """The collector failed or was stopped; the sentence says why and where its log is."""


# ---------------------------------------------------------------- the plan (pure)


def unreferenced(content: Content, removed: Mapping[str, Iterable[str]] | None = None) -> dict:
    """Blob digest -> size of every blob Distribution's collector deletes: those no
    manifest revision references, once the manifests in `removed` (per repository: the
    untagged ones `--delete-untagged` deletes first) are gone."""
    removed = removed or {}
    marked: set[str] = set()
    for name, repository in content.repositories.items():
        for digest in repository.revisions - set(removed.get(name, ())):
            marked.add(digest)
            manifest = content.manifest(digest)
            if manifest is not None:
                marked.update(blob.digest for blob in manifest.blobs)
                marked.update(child.digest for child in manifest.children)
    return {digest: size for digest, size in content.blobs.items() if digest not in marked}


def by_repository(
    content: Content,
    blobs: Mapping[str, int],
    manifests: Mapping[str, Manifest] | None = None,
) -> dict[str, dict[str, int]]:
    """The blobs of `blobs` per repository that linked them (as a layer, a config or a
    manifest revision). A deleted manifest's own blob is linked nowhere any more: given
    in `manifests` (parsed from storage), it goes to the repository whose blobs it
    references. Whatever no repository claims (an upload never referenced) is under ''."""
    manifests = manifests or {}
    owner: dict[str, str] = {}
    for name, repository in sorted(content.repositories.items()):
        for digest in repository.layers | repository.revisions:
            owner.setdefault(digest, name)
    out: dict[str, dict[str, int]] = {}
    for digest, size in sorted(blobs.items()):
        name = owner.get(digest)
        if name is None and digest in manifests:
            referenced = [b.digest for b in manifests[digest].blobs]
            name = next((owner[d] for d in referenced if d in owner), None)
        out.setdefault(name or "", {})[digest] = size
    return dict(sorted(out.items()))


def unlinked_manifests(storage: Storage, content: Content, blobs: Mapping[str, int]) -> dict:
    """The blobs of `blobs` that no repository links and that read as a manifest (small
    JSON with a config or layers): a deleted manifest's own blob, for `by_repository`."""
    linked = set()
    for repository in content.repositories.values():
        linked |= repository.layers | repository.revisions
    found = {}
    for digest, size in blobs.items():
        if digest in linked or size > 4 * 1024 * 1024:
            continue
        try:
            manifest = parse_manifest(digest, storage.read(blob_path(digest)))
        except StorageError:
            continue
        if manifest.blobs or manifest.children:
            found[digest] = manifest
    return found


def read_blobs(storage: Storage) -> dict[str, int]:
    """Every blob in storage with its size (a walk of the blob store alone)."""
    blobs: dict[str, int] = {}
    for path, size in storage.walk(f"{V2}/blobs"):
        parts = path.split("/")
        if parts[-1] == "data" and len(parts) >= 4:
            blobs[f"{parts[-4]}:{parts[-2]}"] = size
    return blobs


def human(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns


def expected_seconds(objects: int, remote: bool, previous_window: float | None) -> float:
    """How long the window will likely stay open, for the clients' "until about HH:MM":
    the last window's length with a margin, else a rough cost per object walked (an s3
    request costs ten times a file)."""
    guess = 60 + objects * (0.02 if remote else 0.002)
    if previous_window:
        guess = max(guess, previous_window * 1.5 + 30)
    return guess


# ---------------------------------------------------------------- the stats file


def read_stats(path: Path) -> dict:
    try:
        stats = json.loads(path.read_text())
        if isinstance(stats, dict):
            return stats
    except (OSError, ValueError):
        pass
    return {"runs": 0, "freed_bytes_total": 0, "freed_blobs_total": 0, "last": None}


def next_stats(previous: dict, last: dict) -> dict:
    """The stats file after one more run: totals grow, `last` is this run."""
    return {
        "runs": int(previous.get("runs", 0)) + 1,
        "freed_bytes_total": int(previous.get("freed_bytes_total", 0)) + last["freed_bytes"],
        "freed_blobs_total": int(previous.get("freed_blobs_total", 0)) + last["freed_blobs"],
        "last": last,
    }


def write_stats(path: Path, stats: dict) -> None:
    """Mode 0644: the token service's /metrics reads it."""
    atomic_write(path, (json.dumps(stats, indent=2) + "\n").encode(), 0o644)


# ---------------------------------------------------------------- the collector


@dataclass(frozen=True)
class CollectorResult:
    seconds: float
    peak_rss_bytes: int  # of docker-registry garbage-collect
    output: Path


def _as_account(uid: int | None, gid: int | None) -> Callable[[], None]:
    def prepare() -> None:
        if uid is not None and gid is not None:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
        # After setuid (a change of credentials clears it): the collector dies with us,
        # so a killed run never leaves it deleting while the registry is read-write again.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return prepare


def run_collector(
    command: list[str],
    environment: dict[str, str],
    account: str | None,
    output: Path,
    redact: Callable[[str], str],
    still_safe: Callable[[], str | None],
) -> CollectorResult:
    """Run Distribution's collector to the end, as `account` (the registry's, when we
    are root), its output masked into `output`. `still_safe()` is asked every 50 ms and
    returns why the collector must stop (the registry is not read-only any more): it is
    then killed at once and CollectionError says why."""
    uid = gid = None
    if account is not None:
        import pwd

        entry = pwd.getpwnam(account)
        uid, gid = entry.pw_uid, entry.pw_gid
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    last_error: list[str] = []
    with open(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as log:
        process = subprocess.Popen(
            command,
            env=environment,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_as_account(uid, gid),
        )  # noqa: PLW1509

        def pump() -> None:
            assert process.stdout is not None
            for raw in iter(process.stdout.readline, b""):
                line = redact(raw.decode("utf-8", "replace").rstrip("\n"))
                log.write(line + "\n")
                if "level=error" in line or "level=fatal" in line or line.startswith("failed"):
                    last_error[:] = [line.strip()[:300]]
            process.stdout.close()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        rusage = None
        status = 0
        stopped_because: str | None = None
        while True:
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                break
            why = still_safe()
            if why:
                stopped_because = why
                process.kill()
                _, status, rusage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(WATCH_SECONDS)
        reader.join(10)
    seconds = time.monotonic() - started
    if stopped_because:
        raise CollectionError(
            f"the garbage collection was stopped: {stopped_because}; nothing it had not "
            f"deleted yet was touched, and the next run starts over (its output: {output})."
        )
    if process.returncode != 0:
        why = f" ({last_error[0]})" if last_error else ""
        raise CollectionError(
            f"docker-registry garbage-collect exited with status {process.returncode}{why}; "
            f"its output is in {output}."
        )
    return CollectorResult(seconds, (rusage.ru_maxrss if rusage else 0) * 1024, output)
