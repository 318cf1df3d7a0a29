"""The registry's notifications, as the auth service receives them: what to record.

Distribution posts envelopes `{"events": [...]}`; each event has an `id`, a `timestamp`
(RFC 3339), an `action` (push, pull, delete, mount), a `target` (mediaType, size,
digest, repository, tag, url), a `request` (addr, method, useragent) and an `actor`
(name: the token's subject). Blob and manifest events are separate: a push is one
event per new blob and one for the manifest.

From an envelope this module makes two lists, and decides nothing else:
- the manifest events (push, pull, delete), the push and pull history;
- the blobs a push or mount brought into a repository (digest, size; a pushed
  manifest is one too), which the service adds to the repository's project until usage
  is next computed from storage.

The registry sends blob pulls to neither of the appliance's endpoints (see
recipes/registry.py `appliance_endpoints`), so a pull storm costs one event per
manifest, not one per layer.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from appliance.auth.names import is_check_probe, is_repository_name
from appliance.auth.store import RegistryEvent
from appliance.registry_api import OWN_SUBJECTS

BLOB_TYPE = "application/octet-stream"
"""The media type Distribution 2.8 gives every blob event (layers and configs alike)."""
MAX_TEXT = 256
MAX_EVENTS = 1000
"""Events read from one envelope (2.8 sends one per envelope; a bound all the same)."""


class BadEnvelope(ValueError):
    """Not an envelope of registry events."""


@dataclass(frozen=True)
class Envelope:
    manifests: list[RegistryEvent]
    pushed_blobs: list[tuple[str, str, int, float]]  # repository, digest, size, at


def parse(body: bytes) -> Envelope:
    try:
        document = json.loads(body)
    except ValueError as error:
        raise BadEnvelope(f"not JSON: {error}") from error
    events = document.get("events") if isinstance(document, dict) else None
    if not isinstance(events, list):
        raise BadEnvelope('no "events" list')
    manifests: list[RegistryEvent] = []
    blobs: list[tuple[str, str, int, float]] = []
    for event in events[:MAX_EVENTS]:
        if not isinstance(event, dict):
            continue
        target = _mapping(event.get("target"))
        repository = _text(target.get("repository"))
        action = _text(event.get("action"))
        if not repository or not is_repository_name(repository) or is_check_probe(repository):
            continue  # the check's probe is pushed and removed again: not a user's history
        at = _timestamp(event.get("timestamp"))
        media_type = _text(target.get("mediaType"))
        digest = _text(target.get("digest"))
        size = _size(target.get("size"))
        is_blob = media_type == BLOB_TYPE or "/blobs/" in _text(target.get("url"))
        if is_blob:
            if action in ("push", "mount") and digest and size is not None:
                blobs.append((repository, digest, size, at))
            continue
        if action not in ("push", "pull", "delete"):
            continue
        actor = _text(_mapping(event.get("actor")).get("name")) or None
        if action == "pull" and actor in OWN_SUBJECTS:
            # The appliance reading a manifest (the admin API's and the pages' listings,
            # the tag gate's HEAD) is no client's pull: it must not move last_pulled,
            # which retention's --pulled-within keeps images by.
            continue
        if action == "push" and digest and size is not None:
            blobs.append((repository, digest, size, at))  # a manifest is stored as a blob
        request = _mapping(event.get("request"))
        manifests.append(
            RegistryEvent(
                event_id=_text(event.get("id")) or f"{repository}@{digest}@{at}@{action}",
                action=action,
                repository=repository,
                tag=_text(target.get("tag")) or None,
                digest=digest or None,
                media_type=media_type or None,
                size=size,
                actor=actor,
                address=_text(request.get("addr")) or None,
                user_agent=_text(request.get("useragent")) or None,
                at=at,
            )
        )
    return Envelope(manifests, blobs)


def _mapping(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else ""


def _size(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _timestamp(value: object) -> float:
    """Seconds since the epoch of the event's RFC 3339 time (Go writes nanoseconds,
    which fromisoformat before 3.11 refuses: cut to microseconds)."""
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        head, dot, rest = text.partition(".")
        if dot:
            digits = len(rest) - len(rest.lstrip("0123456789"))
            text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
        try:
            return dt.datetime.fromisoformat(text).timestamp()
        except ValueError:
            pass
    return dt.datetime.now(dt.UTC).timestamp()
