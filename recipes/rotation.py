"""Signing-key rotation (`appliance-ctl rotate-token-key`): two steps of one pipeline run.

1. The secrets file gains the new key as "next" and the registry's bundle carries the
   old and the new certificate: the registry is handed over (no request refused) and
   trusts both before anything signs with the new key.
2. Late, once that handover is done: the secrets file makes the new key the signing
   one and keeps the old certificate as "previous" until the last token it signed has
   expired; the auth service gets the new key and reloads.

So no token is ever signed by a key the registry does not trust yet, and a token signed
by the old key goes on working until it expires. A run stopped between the steps leaves
the rotating state, which a plain reconfigure keeps as it is (both certificates trusted,
the old key signing) and `rotate-token-key` run again completes.

With an external registry (registry.enable: false) the appliance cannot hand that
registry over: the first run stops after step 1 and says which file to copy there; the
admin restarts that registry and runs `rotate-token-key --continue` for step 2.

On a node of a cluster (`appliance-ctl cluster export` recorded the cluster's keys in
the shared storage: appliance/cluster.py) the other nodes' registries are in the same
position as an external one: the run stops after step 1 too, the admin shares the
rotating state (`cluster export` here, `cluster join` on every other node: every
registry then trusts both keys, every node still signs with the old one), and
`rotate-token-key --continue` makes this node sign with the new key; a second export
and join brings the others onto it. No token is refused on the way.

`--finish` drops the previous certificate once its time has passed (earlier only with
`--force`); any reconfigure after that time drops it too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime

from appliance import secrets as secrets_module
from appliance.engine import Report
from appliance.errors import ApplianceError, ConfigError
from appliance.pipeline import Run
from appliance.resources import Resource
from appliance.secrets import Secrets
from appliance.settings import Settings

# gunicorn's graceful_timeout: old workers may finish a request (and sign a token with
# the old key) this long after the reload.
AUTH_GRACEFUL_SECONDS = 10
# The appliance's own admin tokens (recipes.registry_api) live this long.
ADMIN_TOKEN_LIFETIME = 60


def preflight(settings: Settings) -> None:
    """Refuse what no rotation can mean, before the lock is taken."""
    if settings.registry.internal_key:
        raise ConfigError(
            "registry.internal_key is set in appliance.yml: the token service signs with "
            "the key you provide, which the appliance does not replace; to rotate it, put "
            "the new key in registry.internal_key and copy the new certificate to every "
            "registry that trusts the old one (tokens the old key signed are refused from "
            "then on), or remove registry.internal_key to let the appliance generate and "
            "rotate its own key."
        )
    if not settings.auth.enable:
        raise ConfigError(
            "auth.enable is false: the appliance's token service signs no tokens, so it "
            "has no signing key to rotate."
        )
    if not settings.paths.secrets_file.exists():
        raise ApplianceError(
            f"{settings.paths.secrets_file} does not exist: run appliance-ctl reconfigure first."
        )


def external(settings: Settings) -> bool:
    """The registry that checks the tokens is not the appliance's own."""
    return not settings.registry.enable


def clustered(settings: Settings) -> bool:
    """Other nodes' registries check this node's tokens: the cluster's record exists."""
    from appliance import cluster
    from recipes import registry_storage

    try:
        return cluster.recorded(registry_storage(settings)) is not None
    except ApplianceError:
        return False  # a storage the appliance cannot read: no record it could see


def until_text(epoch: float) -> str:
    return f"{datetime.fromtimestamp(epoch, UTC):%H:%M} UTC ({secrets_module.format_time(epoch)})"


def key_id(certificate_pem: str) -> str:
    """The libtrust key ID the registry looks tokens' `kid` up by."""
    from cryptography import x509

    from appliance.auth.tokens import libtrust_key_id

    return libtrust_key_id(x509.load_pem_x509_certificate(certificate_pem.encode()).public_key())


def rotation(settings: Settings, resume_external: bool = False) -> Run:
    """`appliance-ctl rotate-token-key [--continue]`."""
    from recipes import auth, base, registry, services

    state: dict[str, Secrets] = {}
    outside = external(settings)
    others = not outside and clustered(settings)
    waits = outside or others  # step 2 waits for registries this run cannot hand over

    def begin() -> Secrets:
        current = secrets_module.for_settings(settings)
        if others and current.rotating and not resume_external:
            raise ConfigError(
                "A rotation waits for the other nodes of the cluster: run appliance-ctl "
                "cluster export FILE here and cluster join FILE on every other node, then "
                "appliance-ctl rotate-token-key --continue here."
            )
        if outside and current.rotating and not resume_external:
            raise ConfigError(
                f"A rotation waits for the external registry: copy "
                f"{settings.paths.token_signing_certificate} (the old and the new "
                f"certificate) to its auth.token.rootcertbundle and restart it, then run "
                f"appliance-ctl rotate-token-key --continue."
            )
        if resume_external and not (waits and current.rotating):
            raise ConfigError(
                "There is no rotation waiting for an external registry or the other nodes "
                "of a cluster; run appliance-ctl rotate-token-key without --continue."
            )
        state["before"] = current
        rotating = secrets_module.begin_rotation(
            current, settings.registry.token_key_type, settings.registry.issuer
        )
        state["rotating"] = rotating
        return rotating

    def step_one(secrets: Secrets) -> Iterable[Resource]:
        out: list[Resource] = [base.secrets_file(settings, secrets)]
        if not outside:
            out.append(registry.token_bundle_file(settings, secrets))
        # Every trusted certificate: for an external registry what the admin copies to
        # it; for the tag rules the certificates whose tokens they must verify. The
        # service signs on with the old key (its certificate is in the file still).
        out.append(auth.signing_certificate_file(settings, secrets))
        return out

    def step_two(secrets: Secrets) -> Iterable[Resource]:
        if waits and not resume_external:
            return []
        lifetime = max(settings.auth.token_lifetime, ADMIN_TOKEN_LIFETIME)
        until = secrets_module.trusted_until(time.time(), lifetime, AUTH_GRACEFUL_SECONDS)
        rotated = secrets_module.complete_rotation(secrets, until)
        state["rotated"] = rotated
        return [
            base.secrets_file(settings, rotated),
            auth.signing_certificate_file(settings, rotated),
            auth.signing_key_file(settings, rotated),
        ]

    def summary(report: Report, elapsed: float) -> str:
        return (
            f"rotate-token-key: {report.updated}/{len(report.outcomes)} resources updated "
            f"in {elapsed:.2f} s" + ("; failed" if report.failed else "")
        )

    def messages(report: Report) -> list[str]:
        before, rotating = state["before"], state["rotating"]
        resumed = before.rotating
        new_kid = key_id(rotating.next_token_signing_certificate)
        lines = []
        if resumed:
            lines.append("Resumed the rotation begun earlier (same new key).")
        if others and not resume_external:
            return [
                *lines,
                f"Step 1 of 2 done: this node's registry trusts the old and the new key "
                f"(new key {new_kid}); every node still signs with the old one.",
                "Share it: appliance-ctl cluster export FILE here, cluster join FILE on "
                "every other node (their registries then trust the new key too), then "
                "appliance-ctl rotate-token-key --continue here.",
            ]
        if outside and not resume_external:
            return [
                *lines,
                f"Step 1 of 2 done: {settings.paths.token_signing_certificate} holds the "
                f"old and the new certificate (new key {new_kid}); the token service still "
                f"signs with the old key.",
                "Copy that file to the external registry's auth.token.rootcertbundle and "
                "restart the registry, then run appliance-ctl rotate-token-key --continue "
                "to make the token service sign with the new key.",
            ]
        rotated = state["rotated"]
        until = rotated.previous_trusted_until
        assert until is not None
        lines += [
            f"The token service signs with the new key {new_kid}.",
            f"The old key stays trusted until {until_text(until)}; any reconfigure after "
            f"that removes it (or appliance-ctl rotate-token-key --finish).",
        ]
        if others:
            lines.append(
                "The other nodes sign with the old key until they join again: run "
                "appliance-ctl cluster export FILE here and cluster join FILE on every "
                "other node (both keys are trusted everywhere meanwhile)."
            )
        if outside:
            lines.append(
                "The external registry needs no change now; after --finish, copy "
                f"{settings.paths.token_signing_certificate} to it again to drop the old "
                f"certificate there too."
            )
        return lines

    return Run(
        name="rotate-token-key",
        log_name="rotate-token-key",
        resources=step_one,
        late_resources=step_two,
        services=services(settings),
        secrets=begin,
        preflight=lambda: preflight(settings),
        summary=summary,
        messages=messages,
        start_services=False,
        check_every_service=False,
    )


def finish(settings: Settings, force: bool = False) -> Run:
    """`appliance-ctl rotate-token-key --finish [--force]`: the previous certificate out
    of the bundle (registry handover) and of the auth service's certificate file."""
    from recipes import auth, base, registry, services

    state: dict[str, Secrets] = {}

    def load() -> Secrets:
        # Loaded as of long ago: a previous certificate whose time has passed is still
        # there to be dropped by this run (a plain load would already have forgotten it).
        current = secrets_module.for_settings(settings, now=0)
        state["before"] = current
        return secrets_module.finish_rotation(current, time.time(), force)

    def resources(secrets: Secrets) -> Iterable[Resource]:
        out: list[Resource] = [
            base.secrets_file(settings, secrets),
            auth.signing_certificate_file(settings, secrets),
        ]
        if not external(settings):
            out.append(registry.token_bundle_file(settings, secrets))
        return out

    def summary(report: Report, elapsed: float) -> str:
        return (
            f"rotate-token-key --finish: {report.updated}/{len(report.outcomes)} resources "
            f"updated in {elapsed:.2f} s" + ("; failed" if report.failed else "")
        )

    def messages(report: Report) -> list[str]:
        before = state["before"]
        old_kid = key_id(before.previous_token_signing_certificate)
        lines = [f"The old key {old_kid} is no longer trusted; only the current key verifies."]
        if external(settings):
            lines.append(
                f"Copy {settings.paths.token_signing_certificate} to the external "
                f"registry's auth.token.rootcertbundle and restart it to drop the old "
                f"certificate there too."
            )
        return lines

    return Run(
        name="rotate-token-key",
        log_name="rotate-token-key",
        resources=resources,
        services=services(settings),
        secrets=load,
        preflight=lambda: preflight(settings),
        summary=summary,
        messages=messages,
        start_services=False,
        check_every_service=False,
    )
