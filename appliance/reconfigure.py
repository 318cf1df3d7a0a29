"""`appliance-ctl reconfigure`: make the host match appliance.yml.

Order of a run: take the lock; load secrets (generated only if missing); ask every
recipe for its resources; converge them; then bring supervisord in line (start it if
needed, add/remove programs) and run the queued notifications once; then converge the
resources that need running services (a Let's Encrypt order needs nginx up to answer
its challenge) and notify again. Every line printed also goes to a log of the run.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from appliance import secrets as secrets_module
from appliance.engine import Engine, Report, queue, raise_if_failed
from appliance.errors import LockError, ServiceError
from appliance.resources import Notify
from appliance.settings import Paths, Settings

if TYPE_CHECKING:
    from appliance.services import Supervisor

LOCK_WAIT_SECONDS = 300
RUN_LOGS_KEPT = 30


@contextmanager
def reconfigure_lock(path: Path, out: Callable[[str], None],
                     wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """One reconfigure at a time; a second one waits, saying for whom, then gives up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            out(f"reconfigure: waiting for the reconfigure run by pid {holder} to finish")
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockError(f"another reconfigure (pid {holder}) has held {path} "
                                        f"for over {int(wait)} s; wait for it or stop it.") \
                            from None
                    time.sleep(0.1)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunLog:
    """Tee of everything a run prints, kept under the log directory."""

    def __init__(self, stream: TextIO, directory: Path | None):
        self.stream = stream
        self.lines: list[str] = []
        self.directory = directory

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        print(line, file=self.stream, flush=True)

    def save(self) -> Path | None:
        if self.directory is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.directory / f"{stamp}.log"
        path.write_text("\n".join(self.lines) + "\n")
        os.chmod(path, 0o600)
        for old in sorted(self.directory.glob("*.log"))[:-RUN_LOGS_KEPT]:
            old.unlink(missing_ok=True)
        return path


def run(settings: Settings, dry_run: bool = False, stream: TextIO = sys.stdout) -> Report:
    import recipes

    paths = settings.paths
    recipes.preflight(settings)
    out = RunLog(stream, None if dry_run else paths.log_dir / "reconfigure")
    started = time.monotonic()
    lock = reconfigure_lock(paths.lock_file, out) if not dry_run or paths.data_dir.exists() \
        else _no_lock()
    try:
        with lock:
            secrets = secrets_module.for_settings(settings)
            if paths.data_dir.is_dir() and not dry_run:
                from appliance.resources import use_template_cache

                use_template_cache(paths.data_dir / "cache" / "templates")
            engine = Engine(out, dry_run=dry_run)
            # Every resource is built (every template rendered) before the first one is
            # applied: a recipe that refuses a value stops the run with the host untouched.
            report = engine.converge(list(recipes.resources(settings, secrets)),
                                     Report(dry_run=dry_run))
            notify(settings, report.notifications, dry_run, out,
                   program_files_changed=programs_changed(report, paths))
            if not report.failed:
                late = Report()
                engine.converge(recipes.late_resources(settings, secrets), late)
                notify(settings, late.notifications, dry_run, out, start=False,
                       program_files_changed=programs_changed(late, paths))
                report.outcomes += late.outcomes
                report.notifications = queue(report.notifications, late.notifications)
            total, updated = len(report.outcomes), report.updated
            elapsed = time.monotonic() - started
            verb = "would be updated" if dry_run else "updated"
            out(f"reconfigure{' (dry run)' if dry_run else ''}: {updated}/{total} resources "
                f"{verb} in {elapsed:.2f} s")
            for line in recipes.messages(settings, report):
                out(line)
            raise_if_failed(report)
            return report
    finally:
        out.save()


def programs_changed(report: Report, paths: Paths) -> bool:
    """Did supervisord's own config or a program file change (so it must re-read them)?"""
    under = str(paths.supervisor_dir) + os.sep
    return any(o.changes and o.resource.name.startswith(under) for o in report.outcomes)


@contextmanager
def _no_lock() -> Iterator[None]:
    yield


def supervisord_alive(paths: Paths) -> bool:
    try:
        pid = int((paths.supervisor_dir / "supervisord.pid").read_text().strip())
        os.kill(pid, 0)
        return paths.supervisor_socket.exists()
    except (OSError, ValueError):
        return False


def notify(settings: Settings, notifications: list[Notify], dry_run: bool,
           out: Callable[[str], None], start: bool = True,
           program_files_changed: bool = True) -> None:
    """Bring supervisord in line with the program files, then run the queue once.

    A program that supervisord has just started (because supervisord itself was started,
    or because its program file was added or changed) already runs the new files, so a
    queued restart or reload of it is skipped rather than done twice.
    """
    paths = settings.paths
    if dry_run:
        for n in notifications:
            out(f"  would {n.action} {n.service}")
        return
    if not notifications and not program_files_changed and supervisord_alive(paths):
        return  # nothing to start, add, remove or signal: no need to even ask supervisord
    from appliance.services import Supervisor

    supervisor = Supervisor(paths.supervisor_config, paths.supervisor_socket)
    fresh: set[str] = set()
    removed: set[str] = set()
    if start or supervisor.is_running():
        if supervisor.ensure_running():
            out("+ supervisord (started)")
            fresh = {p.name for p in supervisor.status()}
        changes = supervisor.update()
        for verb in ("added", "changed", "removed"):
            for name in changes.get(verb, []):
                out(f"+ service {name} ({verb}{' and started' if verb != 'removed' else ''})")
        fresh |= set(changes.get("added", [])) | set(changes.get("changed", []))
        removed = set(changes.get("removed", []))
    started = fresh - removed
    for n in notifications:
        if n.service in fresh or n.service in removed:
            continue
        if n.action == "reload" and n.service in RELOADABLE:
            reload_service(supervisor, n.service, settings)
            out(f"+ service {n.service} (reloaded)")
        else:
            supervisor.restart(n.service)
            started.add(n.service)
            out(f"+ service {n.service} (restarted)")
    if started:
        # The run ends when what it started serves: a registry that cannot start on its
        # new config is this run's failure, said with the last line of its log.
        supervisor.wait_until_running(started)
        wait_listening(service_addresses(settings, started))


def reload_service(supervisor: Supervisor, name: str, settings: Settings | None = None) -> None:
    """SIGHUP, and for nginx: wait until no worker of the old configuration takes
    connections, so the next request after this run meets the new configuration; for the
    registry: until it is handed over to a process on the new files."""
    if name == "registry" and settings is not None:
        from recipes import registry

        before = registry.handover_state(settings)
        if supervisor.signal(name, "HUP"):
            registry.wait_handed_over(settings, before)
        return
    if name != "nginx":
        supervisor.signal(name, "HUP")
        return
    from recipes import nginx

    [status] = supervisor.status("nginx")
    old_workers = nginx.worker_pids(status.pid) if status.pid else []
    supervisor.signal(name, "HUP")
    nginx.wait_reloaded(old_workers)


def service_addresses(settings: Settings, services: set[str]) -> dict[str, str]:
    """Where each started service answers once it is ready."""
    from recipes import registry

    addresses = {}
    if "registry" in services:
        addresses["registry"] = registry.address(settings)
    if "auth" in services:
        addresses["auth"] = settings.auth.listen_addr
    if "nginx" in services and settings.registry_nginx.enable:
        first = settings.nginx.listen_addresses[0]
        host = "127.0.0.1" if first in ("*", "[::]") else first
        addresses["nginx"] = f"{host}:{settings.registry_nginx.listen_port}"
    return addresses


def wait_listening(addresses: dict[str, str], timeout: float = 30) -> None:
    import socket

    def connect(address: str) -> None:
        if address.startswith("/"):  # a unix socket
            with socket.socket(socket.AF_UNIX) as unix:
                unix.settimeout(1)
                unix.connect(address)
            return
        host, _, port = address.rpartition(":")
        host = "127.0.0.1" if host in ("localhost", "0.0.0.0", "") else host.strip("[]")
        socket.create_connection((host, int(port)), timeout=1).close()

    deadline = time.monotonic() + timeout
    for service, address in addresses.items():
        while True:
            try:
                connect(address)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ServiceError(f"{service} runs but does not accept connections on "
                                       f"{address} ({exc.strerror or exc}); see "
                                       f"appliance-ctl tail {service}.") from None
                time.sleep(0.05)


# Services that re-read their files on SIGHUP without dropping connections (the
# registry's wrapper hands it over to a new process).
RELOADABLE = {"nginx", "auth", "registry"}
# Services whose `appliance-ctl restart` is that reload: new processes on the current
# files, none of them refusing a request (stop, then start, for a cold restart).
GRACEFUL_RESTART = {"auth", "registry"}
