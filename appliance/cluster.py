"""Several nodes, one set of secrets: `appliance-ctl cluster export FILE` and `cluster join
FILE`, and how a node whose keys are not the cluster's is told.

Every node behind one load balancer must sign tokens with the same key (a token one node
issued is checked by another node's registry), run its registry with the same http
secret (an upload begun through one node is continued through another: the registry
signs its upload state with it) and use the same ACME account. The secrets file
(appliance/secrets.py) holds them all; the export file carries every field of it, so a
joined node's secrets file is the exporting node's, rotation state included.

The export file is JSON with a SHA-256 over its secrets: a truncated, mangled or
hand-edited file is refused whole with one sentence. It is a checksum, not a signature
(whoever can edit the file can compute it again): the file is the cluster's keys and is
carried like one (mode 0600, scp, then deleted).

Where the cluster's fingerprints are kept: in the registry's storage, which every node
must share anyway (`appliance/cluster.json` beside `docker/registry/v2`, never read by
the registry). `cluster export` records there a SHA-256 of the signing key and of the
http secret (fingerprints, not the values); `appliance-ctl check` and every reconfigure
compare the node's own with them. The storage rather than the database: it is the one
engine every cluster has (the auth database may still be each node's SQLite while an
admin sets the cluster up), and a node that does not share it is itself the mistake.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ApplianceError
from appliance.secrets import ROTATION_FIELDS, Secrets, format_time, pair_digest

if TYPE_CHECKING:
    from appliance.registry_storage import Storage

FORMAT = "appliance-cluster-secrets/1"
RECORD_PATH = "appliance/cluster.json"

# Every field a node must share, in the secrets file's own names. The pair digest is not
# among them: each node computes it from the key and certificate it installed.
SHARED_FIELDS = (
    "token_signing_key",
    "token_signing_certificate",
    "registry_http_secret",
    "auth_secret",
    "letsencrypt_account_key",
    "registry_events_secret",
    *ROTATION_FIELDS,
)
REQUIRED_FIELDS = (
    "token_signing_key",
    "token_signing_certificate",
    "registry_http_secret",
    "letsencrypt_account_key",
)


class ClusterError(ApplianceError):
    """An export file that cannot be joined, or a node that is not the cluster's."""


def checksum(values: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def shared_values(secrets: Secrets) -> dict[str, str]:
    return {name: getattr(secrets, name) for name in SHARED_FIELDS if getattr(secrets, name)}


def export_document(secrets: Secrets, now: float | None = None) -> bytes:
    """What `cluster export` writes: the shared secrets, their checksum, and who wrote it."""
    values = shared_values(secrets)
    document = {
        "format": FORMAT,
        "exported_by": socket.gethostname(),
        "exported_at": format_time(time.time() if now is None else now),
        "secrets": values,
        "sha256": checksum(values),
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def read_document(path: Path) -> dict[str, str]:
    """The shared secrets of an export file, verified whole (format, checksum, every
    required field, the certificate belongs to the key), or one sentence on what is
    wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ClusterError(
            f"{path}: cannot read it ({error.strerror}); give the file "
            f"appliance-ctl cluster export wrote on a node of the cluster."
        ) from None
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ClusterError(
            f"{path}: not an export file (not JSON); give the file appliance-ctl cluster "
            f"export wrote, copied whole."
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ClusterError(
            f"{path}: not an export file of this appliance (format {FORMAT} expected); "
            f"give the file appliance-ctl cluster export wrote."
        )
    values = document.get("secrets")
    if (
        not isinstance(values, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
        or document.get("sha256") != checksum(values)
    ):
        raise ClusterError(
            f"{path}: its checksum does not match its content (the file was changed or "
            f"cut short); export it again on a node of the cluster and copy it whole."
        )
    unknown = sorted(set(values) - set(SHARED_FIELDS))
    missing = [name for name in REQUIRED_FIELDS if not values.get(name)]
    if unknown or missing:
        raise ClusterError(
            f"{path}: {'unknown fields ' + ', '.join(unknown) if unknown else ''}"
            f"{' and ' if unknown and missing else ''}"
            f"{'missing ' + ', '.join(missing) if missing else ''}; export it again with "
            f"this version of the appliance."
        )
    from appliance import pki

    try:
        matches = pki.public_key_matches(
            values["token_signing_certificate"].encode(), values["token_signing_key"].encode()
        )
    except pki.CertificateError:
        matches = False
    if not matches:
        raise ClusterError(
            f"{path}: its token-signing certificate does not belong to its key; export "
            f"it again on a node of the cluster."
        )
    return values


def joined(stored: dict[str, str], shared: dict[str, str]) -> dict[str, str]:
    """The secrets file of a node that joins: its own fields with every shared one
    replaced (a rotation field the cluster does not have is dropped)."""
    out = {k: v for k, v in stored.items() if k not in SHARED_FIELDS}
    out.update(shared)
    out["token_signing_pair_digest"] = pair_digest(
        shared["token_signing_key"], shared["token_signing_certificate"]
    )
    return out


def check_joinable(internal_key: str | None, shared: dict[str, str]) -> None:
    """registry.internal_key in appliance.yml wins over the secrets file; a different one
    would undo the join at the next reconfigure."""
    if internal_key and internal_key.strip() != shared["token_signing_key"].strip():
        raise ClusterError(
            "registry.internal_key is set in appliance.yml and is not the cluster's "
            "signing key; remove it (the key then comes from the joined secrets) or set "
            "the same key on every node."
        )


# ---------------------------------------------------------------- fingerprints


def fingerprint(name: str, value: str) -> str:
    """A SHA-256 that names a secret without revealing it (the values are 256-bit
    random or private keys: no guess finds them from it)."""
    return hashlib.sha256(f"appliance-cluster:{name}\0{value}".encode()).hexdigest()


def fingerprints(secrets: Secrets) -> dict[str, str]:
    return {
        "token_signing_key": fingerprint("token_signing_key", secrets.token_signing_key),
        "registry_http_secret": fingerprint("registry_http_secret", secrets.registry_http_secret),
    }


WHAT = {"token_signing_key": "token-signing key", "registry_http_secret": "registry http secret"}


def record(storage: Storage, secrets: Secrets, now: float | None = None) -> None:
    """Make this node's fingerprints the cluster's, in the shared storage."""
    document = {
        "recorded_by": socket.gethostname(),
        "recorded_at": format_time(time.time() if now is None else now),
        "fingerprints": fingerprints(secrets),
    }
    storage.write(RECORD_PATH, io.BytesIO((json.dumps(document, indent=2) + "\n").encode()))


def recorded(storage: Storage) -> dict | None:
    """The cluster's record, None when no node ever exported (a single node)."""
    from appliance.registry_storage import StorageError

    if not any(path == RECORD_PATH for path, _ in storage.walk(RECORD_PATH.rpartition("/")[0])):
        return None
    try:
        document = json.loads(storage.read(RECORD_PATH))
    except ValueError:
        raise StorageError(
            f"{RECORD_PATH} in {storage.description} is not JSON; run appliance-ctl cluster "
            f"export again on a node whose keys are right."
        ) from None
    return document if isinstance(document, dict) else None


@dataclass(frozen=True)
class Verdict:
    matches: bool
    sentence: str


def compare(record: dict, secrets: Secrets) -> Verdict:
    """Whether this node's secrets are the ones the cluster's record names, in a sentence."""
    theirs = record.get("fingerprints") or {}
    mine = fingerprints(secrets)
    differ = [WHAT[name] for name in mine if theirs.get(name) != mine[name]]
    who = f"{record.get('recorded_by', '?')} at {record.get('recorded_at', '?')}"
    if not differ:
        return Verdict(True, f"signing key and http secret are the cluster's (exported by {who}).")
    return Verdict(
        False,
        f"this node's {' and '.join(differ)} {'differ' if len(differ) > 1 else 'differs'} "
        f"from the cluster's (exported by {who}): "
        f"tokens or uploads that pass through another node fail here; run "
        f"appliance-ctl cluster join FILE with a file exported on a node of the cluster "
        f"(or, on the node whose keys are right after a key rotation, cluster export again).",
    )
