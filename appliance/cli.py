"""appliance-ctl: the admin's one command.

Errors of the project's own hierarchy are caught here, once, and printed as one
sentence (plus the list of problems for a bad config); any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager

from appliance import settings as settings_module
from appliance.errors import ApplianceError, ConfigError, UsageError

AUTH_COMMANDS = ("user", "project", "member", "token", "deploy-token", "history")


def build_parser(with_auth_commands: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance-ctl", description="Configure and control the container registry appliance."
    )
    parser.add_argument(
        "-c",
        "--config",
        help="appliance.yml to use (default: $APPLIANCE_CONFIG, else /etc/appliance/appliance.yml)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("reconfigure", help="make the host match appliance.yml")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(handler=cmd_reconfigure)

    p = sub.add_parser("show-config", help="print the effective settings (secrets masked)")
    p.set_defaults(handler=cmd_show_config)

    p = sub.add_parser("example-config", help="print the commented example appliance.yml")
    p.set_defaults(handler=cmd_example_config, needs_settings=False)

    p = sub.add_parser("status", help="state of the services")
    p.add_argument("service", nargs="?")
    p.set_defaults(handler=cmd_status)
    for verb, text in (("start", "start"), ("stop", "stop"), ("restart", "restart")):
        p = sub.add_parser(verb, help=f"{text} one service, or all of them")
        p.add_argument("service", nargs="?")
        if verb == "restart":
            p.add_argument(
                "--cold",
                action="store_true",
                help="stop, then start, even a service that restarts gracefully "
                "(its supervising process runs new code: a package upgrade)",
            )
        p.set_defaults(handler=cmd_control, verb=verb, cold=False)
    p = sub.add_parser(
        "shutdown",
        help="stop every service and supervisord itself "
        "(reconfigure or the appliance-runsvdir unit starts them again)",
    )
    p.set_defaults(handler=cmd_shutdown)
    p = sub.add_parser("hup", help="reload a service (SIGHUP) without dropping connections")
    p.add_argument("service")
    p.set_defaults(handler=cmd_hup)
    p = sub.add_parser("tail", help="follow a service's log (all services if none named)")
    p.add_argument("service", nargs="?")
    p.add_argument("--no-follow", action="store_true", help="print the end and exit")
    p.set_defaults(handler=cmd_tail)

    p = sub.add_parser("renew-certs", help="renew Let's Encrypt certificates that are due")
    p.add_argument("--force", action="store_true", help="renew even if not due")
    p.set_defaults(handler=cmd_renew_certs)

    p = sub.add_parser(
        "rotate-token-key",
        help="sign registry tokens with a new key, without refusing any token of the old one",
    )
    step = p.add_mutually_exclusive_group()
    step.add_argument(
        "--continue",
        dest="resume_external",
        action="store_true",
        help="with an external registry, or on a node of a cluster: switch the token "
        "service to the new key once that registry (every node) trusts the new bundle",
    )
    step.add_argument(
        "--finish",
        action="store_true",
        help="stop trusting the previous key (once its tokens have expired)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --finish: even before the previous key's tokens have expired",
    )
    p.set_defaults(handler=cmd_rotate_token_key)

    p = sub.add_parser(
        "backup",
        help="write one archive of the config, secrets, certificates, auth database and "
        "(filesystem storage) images",
    )
    p.add_argument(
        "--to",
        metavar="DIR",
        help="directory of the archive (default: <data dir>/backups, mode 0700)",
    )
    p.add_argument("--skip-images", action="store_true", help="leave the registry's data out")
    p.set_defaults(handler=cmd_backup)

    p = sub.add_parser(
        "restore",
        help="put a backup archive in place on a fresh install, then reconfigure",
    )
    p.add_argument("archive", metavar="FILE", help="an archive appliance-ctl backup wrote")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace this host's users, projects, tokens and images",
    )
    p.set_defaults(handler=cmd_restore)

    p = sub.add_parser(
        "usage",
        help="storage used per project or repository, deduplicated, from storage itself",
    )
    p.add_argument(
        "--by",
        choices=("project", "repo"),
        default="project",
        help="group by project (default) or repository",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(handler=cmd_usage)

    p = sub.add_parser(
        "check",
        help="diagnose the running appliance: one line per check (ok, warn, FAIL, skip); "
        "exit 1 on a failure",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON (monitoring)")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser(
        "why",
        help="why USER may or may not pull, push or delete REPO (the token service's "
        "decision replayed, with the last audit line); exit 3 when refused",
    )
    p.add_argument("user", help="a username, a deploy token's username, or - for anonymous")
    p.add_argument("action", choices=["pull", "push", "delete"])
    p.add_argument("repository", help="the repository, like team/app")
    p.add_argument(
        "--token",
        type=int,
        metavar="ID",
        help="as signed in with this personal access token of USER (appliance-ctl token list)",
    )
    p.set_defaults(handler=cmd_why)

    p = sub.add_parser(
        "registry-garbage-collect",
        aliases=["gc"],
        help="free the storage no manifest references (pulls go on; pushes wait)",
        description="Run Distribution's garbage collector inside a read-only maintenance "
        "window: pulls keep working, pushes and deletes are refused with a sentence "
        "until it ends.",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be freed, change nothing"
    )
    p.add_argument(
        "--delete-untagged",
        action="store_true",
        help="first delete the manifests no tag reaches (an index's platforms are kept)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="per repository, and timings")
    p.set_defaults(handler=cmd_registry_garbage_collect)

    p = sub.add_parser(
        "retention",
        help="apply the projects' retention policies (appliance-ctl project retention)",
        description="Retention policies: delete the tags a project's policy does not keep.",
    )
    group = p.add_subparsers(dest="retention_command", metavar="ACTION", required=True)
    p = group.add_parser(
        "run",
        help="delete the tags the policies do not keep (every project with a policy, or PATH's); "
        "the blobs are freed by the next garbage collection",
    )
    p.add_argument("path", nargs="?", metavar="PATH", help="only this project's policy")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print exactly the tags a run would delete and why, change nothing",
    )
    p.add_argument(
        "--verbose", "-v", action="store_true", help="also every kept tag, with what keeps it"
    )
    p.set_defaults(handler=cmd_retention_run)

    p = sub.add_parser("storage", help="the registry's storage: migrate it to another place")
    storage_sub = p.add_subparsers(dest="storage_command", metavar="COMMAND", required=True)
    p = storage_sub.add_parser(
        "migrate",
        help="copy the registry's data to another storage while it serves, then switch "
        "registry.storage (pulls go on; pushes wait for a short read-only window)",
        description="Copy the registry's data to the storage FILE.yml describes while the "
        "registry serves, copy the last changes inside a short read-only window (pulls go "
        "on, pushes are refused with a sentence), verify every blob's digest, switch "
        "registry.storage in appliance.yml and reconfigure. The old data is left in place.",
    )
    p.add_argument(
        "--to",
        metavar="FILE.yml",
        required=True,
        help="the new registry.storage section, as in appliance.yml (e.g. s3: {bucket: ...})",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be copied, change nothing"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="migrate to a storage that is not empty (it is made a copy of the current one)",
    )
    p.set_defaults(handler=cmd_storage_migrate)

    p = sub.add_parser(
        "cluster",
        help="share this node's keys with the other nodes of a cluster (README, Several hosts)",
    )
    steps = p.add_subparsers(dest="cluster_command", metavar="STEP", required=True)
    step = steps.add_parser(
        "export",
        help="write the secrets every node must share to FILE (mode 0600) and make them "
        "the cluster's",
    )
    step.add_argument("file", metavar="FILE")
    step.set_defaults(handler=cmd_cluster_export)
    step = steps.add_parser(
        "join",
        help="install the secrets of FILE (written by cluster export) on this node, then "
        "reconfigure",
    )
    step.add_argument("file", metavar="FILE")
    step.set_defaults(handler=cmd_cluster_join)

    if with_auth_commands:
        from appliance import registry_content_cli
        from appliance.auth import cli as auth_cli

        auth_cli.register(sub, registry_content=open_registry_content)
        registry_content_cli.register(sub, open_registry_content)
    return parser


def open_registry_content(s: settings_module.Settings):  # noqa: ANN201 - import kept lazy
    """The registry's content (storage, API, storage lock) as the recipes configure it,
    for `repo`, `tag` and `project delete`."""
    import recipes

    return recipes.registry_content(s)


def load_settings(args: argparse.Namespace) -> settings_module.Settings:
    path, named = settings_module.config_path(args.config)
    return settings_module.load(path, must_exist=named)


def cmd_reconfigure(args: argparse.Namespace, s: settings_module.Settings) -> int:
    import recipes
    from appliance import pipeline

    pipeline.execute(s, recipes.reconfigure(s), dry_run=args.dry_run)
    return 0


def cmd_show_config(args: argparse.Namespace, s: settings_module.Settings) -> int:
    sys.stdout.write(settings_module.to_yaml(s))
    return 0


def cmd_example_config(args: argparse.Namespace, s: object) -> int:
    sys.stdout.write(settings_module.example_config())
    return 0


def _supervisor(s: settings_module.Settings):  # noqa: ANN202 - import kept lazy for speed
    from appliance.services import Supervisor

    return Supervisor(s.paths.supervisor_config, s.paths.supervisor_socket)


def _check_service(s: settings_module.Settings, name: str | None) -> None:
    """Names come from the recipes' service declarations, the list the orchestrator uses."""
    import recipes

    names = [service.name for service in recipes.services(s)]
    if name is not None and name not in names:
        raise UsageError(f"unknown service {name!r}; services are: {', '.join(names)}.")


def _log_disk_note(s: settings_module.Settings) -> str | None:
    import os

    try:
        disk = os.statvfs(s.paths.log_dir)
    except OSError:
        return None
    if disk.f_bavail * disk.f_frsize > 0:
        return None
    return (
        f"warning: the file system of {s.paths.log_dir} is full: services keep serving "
        f"but log lines are lost; free some space there."
    )


def cmd_status(args: argparse.Namespace, s: settings_module.Settings) -> int:
    _check_service(s, args.service)
    statuses = _supervisor(s).status(args.service)
    down = 0
    import recipes

    notes = {service.name: service.status_note for service in recipes.services(s)}
    for st in statuses:
        if st.state == "RUNNING":
            print(f"run: {st.name}: (pid {st.pid}) {st.uptime}s")
        else:
            down += 1
            print(f"down: {st.name}: {st.state.lower()} {st.description}".rstrip())
        note = notes.get(st.name)
        line = note() if note else None
        if line:
            print(f"  {st.name}: {line}")
    note = _log_disk_note(s)
    if note:
        print(note)
    return 3 if down else 0


def cmd_control(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """A service the admin stops stays stopped across reconfigures until the admin starts
    it again: the mark under the supervisor directory tells reconfigure it is on purpose.
    A restart of a service whose contract has a graceful restart (a registry handed over,
    auth's workers replaced) is that signal: new processes, no request refused; `--cold`
    stops and starts it all the same (a package upgrade: gunicorn's master must run the
    new code too)."""
    import recipes
    from appliance.pipeline import mark_stopped, reload_service

    _check_service(s, args.service)
    contracts = {service.name: service for service in recipes.services(s)}
    supervisor = _supervisor(s)
    names = [args.service] if args.service else [p.name for p in supervisor.status()]
    for name in names:
        service = contracts.get(name)
        if (
            args.verb == "restart"
            and not args.cold
            and service is not None
            and service.graceful_restart
            and reload_service(supervisor, service, service.graceful_restart)
        ):
            mark_stopped(s.paths, name, False)
            print(f"ok: restart {name} (graceful: new processes, no request refused)")
            continue
        getattr(supervisor, args.verb)(name)
        mark_stopped(s.paths, name, args.verb == "stop")
        print(f"ok: {args.verb} {name}")
    return 0


def cmd_shutdown(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """Stop everything, supervisord included, and leave no process of this root behind
    (not even one that outlived a supervisord killed earlier)."""
    import recipes
    from appliance.pipeline import sweep_leftovers

    supervisor = _supervisor(s)
    if not supervisor.is_running():
        print("ok: supervisord is not running")
    else:
        supervisor.shutdown()
        print("ok: shutdown")
    sweep_leftovers(s.paths, recipes.services(s), print)
    return 0


def cmd_hup(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """Reload as the service's contract says: its signal and the wait after it, or a
    restart for a service that has no reload (said so)."""
    import recipes
    from appliance.pipeline import reload_service

    _check_service(s, args.service)
    [service] = [x for x in recipes.services(s) if x.name == args.service]
    supervisor = _supervisor(s)
    if not service.reloads_by_signal:
        supervisor.restart(args.service)
        print(f"ok: hup {args.service} (it has no reload: restarted)")
    elif reload_service(supervisor, service):
        print(f"ok: hup {args.service}")
    else:
        print(f"ok: hup {args.service} (not running: its next start reads its files)")
    return 0


def cmd_tail(args: argparse.Namespace, s: settings_module.Settings) -> int:
    _check_service(s, args.service)
    try:
        for chunk in _supervisor(s).tail(args.service, follow=not args.no_follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_renew_certs(args: argparse.Namespace, s: settings_module.Settings) -> int:
    import recipes
    from appliance import pipeline

    pipeline.execute(s, recipes.renewal(s, force=args.force))
    return 0


def cmd_rotate_token_key(args: argparse.Namespace, s: settings_module.Settings) -> int:
    import recipes
    from appliance import pipeline

    if args.force and not args.finish:
        raise UsageError("--force goes with --finish (it drops the previous key before its time).")
    with cluster_run_lock(s, "a key rotation"):
        if args.finish:
            pipeline.execute(s, recipes.finish_token_key_rotation(s, force=args.force))
        else:
            pipeline.execute(s, recipes.rotate_token_key(s, resume_external=args.resume_external))
    return 0


def cmd_cluster_export(args: argparse.Namespace, s: settings_module.Settings) -> int:
    from pathlib import Path

    import recipes

    print(recipes.cluster_export(s, Path(args.file)))
    return 0


def cmd_cluster_join(args: argparse.Namespace, s: settings_module.Settings) -> int:
    from pathlib import Path

    import recipes

    recipes.cluster_join(s, Path(args.file))
    return 0


def cluster_run_lock(s: settings_module.Settings, what: str) -> AbstractContextManager[None]:
    """One maintenance run at a time across the nodes of one auth database (PostgreSQL,
    appliance/auth/cluster.py); on SQLite, nothing beyond this host's own locks."""
    from pathlib import Path

    from appliance.auth.cluster import run_lock

    return run_lock(s.auth_database if s.auth.enable else Path(), what)


def cmd_usage(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """Compute the figures from storage (root reads any driver's), write them for the
    auth service (quotas, metrics) and print them."""
    import json

    import recipes
    from appliance import usage
    from appliance.auth.store import project_quotas

    figures = usage.refresh(s, recipes.registry_storage(s))
    quotas = {p: q for p, q in project_quotas(s.auth_database).items() if q is not None}
    if args.json:
        for path, entry in figures["projects"].items():
            entry["quota_bytes"] = quotas.get(path)
        print(json.dumps(figures, indent=2, sort_keys=True))
    else:
        print("\n".join(usage.report(figures, args.by, quotas)))
    return 0


def cmd_check(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """Every diagnosis at once; exit 1 when one failed (warnings alone exit 0)."""
    import recipes
    from appliance import check

    report = check.run(recipes.check_plan(s))
    sys.stdout.write(report.to_json() if args.json else report.text())
    return 1 if report.failed else 0


def cmd_why(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """The token service's decision for one user, action and repository, in sentences;
    read from the service's own config file, so it is the running service's view."""
    import time

    from appliance.auth import config as auth_config
    from appliance.auth import why
    from appliance.auth.app import TokenService
    from appliance.auth.store import Store

    config = auth_config.load(s.paths.auth_config)
    store = Store(config.database)
    try:
        service = TokenService(config, store)
        explanation = why.explain(
            store,
            service.decide_repository,
            config.default_registry_enabled,
            args.user,
            args.action,
            args.repository,
            args.token,
            config.audit_log,
            time.time(),
        )
    finally:
        store.close()
    print("\n".join(explanation.lines()))
    return 0 if explanation.granted else 3


def cmd_registry_garbage_collect(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """One collection at a time, and none while a tag or repository is being deleted:
    the storage lock is taken first, and a holder makes this exit at once, saying who."""
    import recipes
    from appliance import pipeline
    from appliance.registry_storage import storage_lock

    run = recipes.garbage_collection(
        s, dry_run=args.dry_run, delete_untagged=args.delete_untagged, verbose=args.verbose
    )
    if args.dry_run:
        pipeline.execute(s, run, dry_run=True)
        return 0
    with (
        storage_lock(s.paths.registry_storage_lock, "a garbage collection"),
        cluster_run_lock(s, "a garbage collection"),
    ):
        pipeline.execute(s, run)
    return 0


def cmd_retention_run(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """Under the storage lock (no collection or delete meanwhile); exit 1 when a project's
    --max-delete stopped its policy, after the other projects ran."""
    import recipes
    from appliance import pipeline
    from appliance.registry_storage import storage_lock

    run, state = recipes.retention_run(s, args.path, args.dry_run, args.verbose)
    if args.dry_run:
        pipeline.execute(s, run, dry_run=True)
    else:
        with (
            storage_lock(s.paths.registry_storage_lock, "a retention run"),
            cluster_run_lock(s, "a retention run"),
        ):
            pipeline.execute(s, run)
    if state.refusals:
        stopped = ", ".join(plan for plan, p in state.plans.items() if p.over_limit)
        raise ApplianceError(
            f"--max-delete stopped the policy of {stopped}: nothing was deleted there"
            f"{' (in a real run)' if args.dry_run else ''}."
        )
    return 0


def cmd_storage_migrate(args: argparse.Namespace, s: settings_module.Settings) -> int:
    """The migration run, then a reconfigure with the new settings, both under the
    storage lock: no garbage collection, backup or deletion runs meanwhile."""
    from pathlib import Path

    import recipes
    from appliance import pipeline
    from appliance.registry_storage import storage_lock

    run = recipes.storage_migration(s, Path(args.to).absolute(), args.dry_run, args.force)
    if args.dry_run:
        pipeline.execute(s, run, dry_run=True)
        return 0
    with (
        storage_lock(s.paths.registry_storage_lock, "a storage migration"),
        cluster_run_lock(s, "a storage migration"),
    ):
        pipeline.execute(s, run)
        switched = load_settings(args)
        pipeline.execute(switched, recipes.reconfigure(switched))
    return 0


def cmd_backup(args: argparse.Namespace, s: settings_module.Settings) -> int:
    from pathlib import Path

    import recipes

    recipes.backup(s, Path(args.to).absolute() if args.to else None, args.skip_images)
    return 0


def cmd_restore(args: argparse.Namespace, s: settings_module.Settings) -> int:
    from pathlib import Path

    import recipes

    recipes.restore(s, Path(args.archive).absolute(), force=args.force)
    return 0


def command_word(argv: list[str]) -> str | None:
    """The subcommand named on the command line, skipping global options."""
    words = iter(argv)
    for word in words:
        if word in ("-c", "--config"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The auth commands pull in the auth service's modules; a reconfigure or status
    # does not need them, and every millisecond of a no-op reconfigure counts.
    core = {
        "reconfigure",
        "show-config",
        "example-config",
        "status",
        "start",
        "stop",
        "restart",
        "hup",
        "tail",
        "renew-certs",
        "rotate-token-key",
        "shutdown",
        "backup",
        "restore",
        "check",
        "why",
        "registry-garbage-collect",
        "gc",
        "retention",
        "storage",
    }
    parser = build_parser(with_auth_commands=command_word(argv) not in core)
    args = parser.parse_args(argv)
    try:
        s = load_settings(args) if getattr(args, "needs_settings", True) else None
        return args.handler(args, s)
    except ConfigError as exc:
        print(f"appliance-ctl: {exc}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return exc.exit_code
    except ApplianceError as exc:
        print(f"appliance-ctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
