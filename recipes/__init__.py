"""The recipes, in the order they converge.

Each module has `resources(settings, secrets)`: the desired state of its service, read
top to bottom, with the service each file notifies declared next to the file. Base
first (accounts, directories, secrets), then supervisord's own config (every service
drops its program file there), then certificates, then the services that read them.
`late_resources` are those that need running services (a Let's Encrypt order needs
nginx to answer the challenge). Each service module also declares its service's runtime
contract (`service(settings)`), and this package builds the runs the pipeline executes:
`reconfigure` (everything), `renewal` (the certificates alone), the signing-key
rotation's (`rotate_token_key`, `finish_token_key_rotation`; recipes/rotation.py),
`garbage_collection` (the registry's storage; recipes/registry_gc.py), `retention` (the
projects' retention policies; recipes/retention.py) and `storage_migration`
(recipes/storage_migrate.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import registry_storage as registry_storage_module
from appliance import secrets as secrets_module
from appliance.contracts import Service
from appliance.engine import Report
from appliance.pipeline import Run
from appliance.registry_api import RegistryAPI
from appliance.resources import Resource
from appliance.secrets import Secrets
from appliance.settings import Settings

if TYPE_CHECKING:
    from appliance.check import CheckPlan
    from appliance.cluster import Verdict
    from appliance.registry_content import RegistryContent
    from recipes.retention import Retention as RetentionState


def modules() -> list:
    from recipes import auth, base, janitor, nginx, registry, supervisor, tls

    return [base, supervisor, tls, auth, registry, nginx, janitor]


def service_modules() -> list:
    """The modules that declare a supervised service, in the order the CLI lists them."""
    from recipes import auth, janitor, nginx, registry, tls

    return [nginx, registry, auth, tls, janitor]


def services(settings: Settings) -> list[Service]:
    """Every service's runtime contract (disabled ones too: `enabled` says which)."""
    return [module.service(settings) for module in service_modules()]


def reconfigure(settings: Settings) -> Run:
    """The whole host, as `appliance-ctl reconfigure` makes it."""

    def summary(report: Report, elapsed: float) -> str:
        dry = report.dry_run
        return (
            f"reconfigure{' (dry run)' if dry else ''}: {report.updated}/"
            f"{len(report.outcomes)} resources {'would be updated' if dry else 'updated'} "
            f"in {elapsed:.2f} s"
        )

    return Run(
        name="reconfigure",
        log_name="reconfigure",
        resources=lambda secrets: resources(settings, secrets),
        late_resources=lambda secrets: late_resources(settings, secrets),
        services=services(settings),
        secrets=lambda: cluster_checked(settings, secrets_module.for_settings(settings)),
        preflight=lambda: preflight(settings),
        summary=summary,
        messages=lambda report: messages(settings, report),
    )


def renewal(settings: Settings, force: bool = False) -> Run:
    """One renewal pass (`appliance-ctl renew-certs`, and the renewer twice a day): the
    certificates alone, so nothing is ordered when nothing is due; a renewed one gets
    nginx reloaded (never restarted, and no program change is applied on the way)."""
    from recipes import tls

    return Run(
        name="renew-certs",
        log_name="renewer",
        resources=lambda secrets: tls.renewal_resources(settings, secrets, force),
        services=services(settings),
        secrets=lambda: secrets_module.for_settings(settings),
        preflight=lambda: tls.renewal_preflight(settings),
        intro=lambda: tls.renewal_intro(settings, force),
        summary=tls.renewal_summary,
        messages=lambda report: tls.check_served(settings, report),
        start_services=False,
        check_every_service=False,
        say_failure=True,
        not_running_note="it loads the new certificate when it starts",
    )


def rotate_token_key(settings: Settings, resume_external: bool = False) -> Run:
    """`appliance-ctl rotate-token-key [--continue]`: the registry trusts a new key, then
    the auth service signs with it (recipes/rotation.py)."""
    from recipes import rotation

    return rotation.rotation(settings, resume_external)


def finish_token_key_rotation(settings: Settings, force: bool = False) -> Run:
    """`appliance-ctl rotate-token-key --finish`: the previous key trusted no more."""
    from recipes import rotation

    return rotation.finish(settings, force)


def backup(settings: Settings, directory: Path | None = None, skip_images: bool = False) -> Path:
    """`appliance-ctl backup`: one archive of everything a lost host needs (recipes/backup.py)."""
    from recipes import backup_restore as backup_module

    return backup_module.backup(settings, directory, skip_images)


def restore(settings: Settings, archive: Path, force: bool = False) -> Report:
    """`appliance-ctl restore`: the archive checked whole, the services stopped, its files
    in place, then the one pipeline's reconfigure (which starts everything again)."""
    from appliance import pipeline
    from recipes import backup_restore as backup_module

    def stop_services(out: Callable[[str], None]) -> None:
        from appliance.services import Supervisor

        supervisor = Supervisor(settings.paths.supervisor_config, settings.paths.supervisor_socket)
        if supervisor.is_running():
            supervisor.shutdown()
            out("restore: stopped every service (supervisord shut down)")
        pipeline.sweep_leftovers(settings.paths, services(settings), out)

    restored = backup_module.restore(settings, archive, force, stop_services=stop_services)
    report = pipeline.execute(restored, reconfigure(restored))
    backup_module.hand_over(restored)
    return report


def garbage_collection(
    settings: Settings, dry_run: bool = False, delete_untagged: bool = False, verbose: bool = False
) -> Run:
    """`appliance-ctl registry-garbage-collect`: untagged manifests (when asked), then
    Distribution's collector inside a read-only maintenance window (recipes/registry_gc)."""
    from recipes import registry_gc

    return registry_gc.run(settings, dry_run, delete_untagged, verbose)


def retention_run(
    settings: Settings, path: str | None = None, dry_run: bool = False, verbose: bool = False
) -> tuple[Run, RetentionState]:
    """`appliance-ctl retention run [PATH]`: the projects' retention policies (recipes/
    retention.py); the state's `refusals` name the projects --max-delete stopped."""
    from recipes import retention as retention_module

    return retention_module.run(settings, path, dry_run, verbose)


def storage_migration(
    settings: Settings, target_file: Path, dry_run: bool = False, force: bool = False
) -> Run:
    """`appliance-ctl storage migrate --to FILE.yml`: the registry's data copied to the
    storage FILE.yml describes while it serves, the last changes inside a read-only
    window, then registry.storage switched (recipes/storage_migrate.py)."""
    from recipes import storage_migrate

    return storage_migrate.run(settings, target_file, dry_run, force)


def preflight(settings: Settings) -> None:
    """Checks of things outside appliance.yml (certificate files) before anything changes."""
    from recipes import tls

    tls.preflight(settings)


def resources(settings: Settings, secrets: Secrets) -> Iterator[Resource]:
    for module in modules():
        yield from module.resources(settings, secrets)


def late_resources(settings: Settings, secrets: Secrets) -> Iterator[Resource]:
    for module in modules():
        late = getattr(module, "late_resources", None)
        if late:
            yield from late(settings, secrets)


def messages(settings: Settings, report: Report) -> Iterator[str]:
    """What the admin should read after the summary line (how to log in, say)."""
    for module in modules():
        hook = getattr(module, "messages", None)
        if hook:
            yield from hook(settings, report)


def registry_storage(settings: Settings) -> registry_storage_module.Storage:
    """The registry's storage as configured, for the commands that read or prune it
    directly (garbage collection, content management, usage)."""
    from recipes import registry

    return registry_storage_module.open_storage(registry.storage(settings))


def registry_api(settings: Settings, secrets: Secrets) -> RegistryAPI:
    """The registry's API on its own address, with tokens the appliance signs itself."""
    from appliance.auth.tokens import TokenSigner
    from recipes import registry

    signer = TokenSigner(
        "(secrets file)",
        "(secrets file)",
        settings.registry.issuer,
        settings.registry.service,
        60,
        pem=(secrets.token_signing_key.encode(), secrets.token_signing_certificate.encode()),
    )
    return RegistryAPI(registry.address(settings), signer)


def check_plan(settings: Settings) -> CheckPlan:
    """Where `appliance-ctl check` looks, as the recipes declare it: the services'
    contracts, nginx's listen ports, the certificate files, the signing key and the
    bundle the registry trusts, the registry's storage, its API, the time sources the
    appliance already talks to (ACME, S3, notification endpoints) and the disks."""
    from appliance import check
    from appliance.auth.tokens import TokenSigner
    from appliance.certificates import certificate_paths
    from appliance.pipeline import stopped_by_admin, supervisord_pid
    from recipes import base, janitor, registry, tls

    p, n, rn = settings.paths, settings.nginx, settings.registry_nginx
    local = [{"*": "127.0.0.1", "[::]": "[::1]"}.get(a, a) for a in n.listen_addresses]
    local = [f"[{a}]" if ":" in a and not a.startswith("[") else a for a in local]
    ports = [check.Port(f"{local[0]}:{n.http_port}", "nginx.http_port")]
    if rn.enable:
        ports.append(check.Port(f"{local[0]}:{rn.listen_port}", "registry_nginx.listen_port"))
    certificate, key = certificate_paths(settings)
    storage = registry.storage(settings)
    clock_urls = []
    if settings.tls_mode == "letsencrypt":
        clock_urls.append(settings.letsencrypt.directory_url)
    endpoint = (storage.get("s3") or {}).get("regionendpoint")
    if endpoint:
        clock_urls.append(endpoint if "://" in str(endpoint) else f"https://{endpoint}")
    clock_urls += [e["url"] for e in settings.registry.notifications if not e.get("disabled")]
    disks = [("logs", p.log_dir)]
    root = registry.filesystem_root(settings)
    if settings.registry.enable and root is not None:
        disks.insert(0, ("storage", root))

    def registry_api() -> RegistryAPI:
        signer = TokenSigner(
            settings.registry.key_path,
            p.token_signing_certificate,
            settings.registry.issuer,
            settings.registry.service,
            60,
        )
        return RegistryAPI(registry.address(settings), signer)

    return check.CheckPlan(
        services=services(settings),
        stopped_by_admin=stopped_by_admin(p),
        supervisor_config=p.supervisor_config,
        supervisor_socket=p.supervisor_socket,
        supervisord_pid=supervisord_pid(p),
        registry_host=settings.registry_host,
        ports=ports,
        tls_address=tls.served_address(settings) if rn.enable else None,
        tls_mode=str(settings.tls_mode),
        certificate=certificate,
        certificate_key=key,
        registry_enabled=settings.registry.enable,
        auth_enabled=settings.auth.enable,
        signing_key=Path(settings.registry.key_path),
        # What the registry trusts; with an external registry, the file to copy to it.
        trusted_bundle=p.token_bundle if settings.registry.enable else p.token_signing_certificate,
        issuer=settings.registry.issuer,
        service=settings.registry.service,
        storage=storage,
        storage_user=base.service_user(settings, settings.registry.username),
        storage_lock=p.registry_storage_lock,
        registry_api=registry_api,
        open_storage=lambda: registry_storage(settings),
        clock_urls=clock_urls,
        disks=disks,
        ntp_servers=check.host_ntp_servers(),
        cluster=lambda: cluster_verdict(settings, secrets_module.for_settings(settings)),
        redis=redis_probe(settings),
        database=settings.auth_database if settings.auth.enable else None,
        janitor_state=settings.paths.janitor_state if janitor.janitor_wanted(settings) else None,
    )


def cluster_verdict(settings: Settings, secrets: Secrets) -> Verdict | None:
    """This node's secrets against the cluster's record in the registry's storage; None
    when there is none (a single node) or the storage is no kind the appliance reads."""
    from appliance import cluster

    if not settings.registry.enable:
        return None
    try:
        storage = registry_storage(settings)
    except registry_storage_module.StorageError:
        return None  # a driver the appliance cannot read (azure, gcs, ...)
    record = cluster.recorded(storage)
    return None if record is None else cluster.compare(record, secrets)


CLUSTER_CHECK_SECONDS = 10


def cluster_checked(settings: Settings, secrets: Secrets) -> Secrets:
    """The secrets reconfigure is about to use, refused before anything changes when
    they are not the cluster's: such a node would fail every token another node
    issued. A storage that does not answer decides nothing (the registry says why)."""
    import threading

    from appliance import cluster

    found: list = []

    def ask() -> None:
        try:
            found.append(cluster_verdict(settings, secrets))
        except registry_storage_module.StorageError:
            found.append(None)

    # An endpoint that does not answer would hold the run for botocore's retries of its
    # 60 s connect timeout: the question is given CLUSTER_CHECK_SECONDS, then dropped.
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(CLUSTER_CHECK_SECONDS)
    verdict = found[0] if found else None
    if verdict is not None and not verdict.matches:
        raise cluster.ClusterError(verdict.sentence[:1].upper() + verdict.sentence[1:])
    return secrets


def cluster_export(settings: Settings, target: Path) -> str:
    """`appliance-ctl cluster export FILE`: the shared secrets to FILE (0600), and their
    fingerprints made the cluster's in the shared storage; returns what to tell the
    admin."""
    from appliance import cluster
    from appliance.resources import atomic_write

    if not settings.paths.secrets_file.exists():
        raise cluster.ClusterError(
            f"{settings.paths.secrets_file} does not exist yet; run appliance-ctl "
            f"reconfigure on this node first, then export."
        )
    if not target.parent.is_dir():
        raise cluster.ClusterError(
            f"{target.parent} is not a directory; name a file in an existing directory."
        )
    secrets = secrets_module.for_settings(settings)
    storage = registry_storage(settings)
    cluster.record(storage, secrets)
    atomic_write(target, cluster.export_document(secrets), 0o600)
    return (
        f"cluster export: wrote {target} (mode 0600: it holds the signing key and the "
        f"registry's http secret); these keys are now the cluster's (fingerprints in "
        f"{storage.description}). Copy it to each other node, run appliance-ctl cluster "
        f"join {target.name} there, then delete every copy."
    )


def cluster_join(settings: Settings, source: Path) -> Report:
    """`appliance-ctl cluster join FILE`: the file checked whole, its secrets installed
    in this node's secrets file, then the one pipeline's reconfigure."""
    import json

    from appliance import cluster, pipeline
    from appliance.resources import atomic_write

    shared = cluster.read_document(source)
    cluster.check_joinable(settings.registry.internal_key, shared)
    path = settings.paths.secrets_file
    values = cluster.joined(secrets_module.read(path), shared)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(values, indent=2, sort_keys=True) + "\n").encode(), 0o600)
    return pipeline.execute(settings, reconfigure(settings))


def redis_probe(settings: Settings) -> tuple[str, str | None] | None:
    """Where `check` pings the registry's Redis, and with which password."""
    from appliance.errors import ConfigError
    from recipes import registry

    if not settings.registry.enable or not settings.redis.url:
        return None
    try:
        section = registry.redis(settings)
    except ConfigError:  # an unreadable password file: Redis's own answer says the rest
        section = registry.redis(dataclasses.replace(settings, redis=dataclasses.replace(
            settings.redis, password_file=None)))  # fmt: skip
    assert section is not None
    return section["addr"], section.get("password")


def registry_content(settings: Settings) -> RegistryContent:
    """The registry's content as `repo`, `tag` and `project delete` see and change it:
    its storage, its API (the signing key is read only when a delete needs it) and the
    storage lock the garbage collection holds too."""
    from appliance.registry_content import RegistryContent
    from recipes import registry

    return RegistryContent(
        registry_storage(settings),
        lambda: registry_api(settings, secrets_module.for_settings(settings)),
        settings.paths.registry_storage_lock,
        deletes_enabled=bool(registry.storage(settings)["delete"].get("enabled")),
    )
