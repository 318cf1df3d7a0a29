"""One pipeline for every run that changes the host.

lock -> run log -> preflight -> engine -> notifications -> "every service this run
touched (a reconfigure: every enabled service) is RUNNING and answers" -> result.

Reconfigure and certificate renewal are two `Run`s, two resource lists through the same
function, as Omnibus's `renew-le-certs` is its reconfigure with another run list; garbage
collection, backup or key rotation are a new `Run`, not a new scaffold. The recipes build
the `Run` (appliance core never imports them); the CLI hands it over.

Crash consistency: before a resource changes the host, the notifications it will queue
are made durable in a journal under the data directory (written, fsynced, renamed).
A run killed (kill -9, a dropped SSH session's SIGHUP) between writing files and running
their restarts or reloads leaves the journal behind, and the next run runs them, so the
processes converge with the files. The journal is removed once its notifications ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from appliance import procfs
from appliance.contracts import Service
from appliance.engine import Engine, Report, queue, raise_if_failed
from appliance.errors import ApplianceError, ServiceError
from appliance.launcher import SERVICE_MARKER
from appliance.reconfigure import RunLog, reconfigure_lock, redactor
from appliance.resources import Notify, Resource, atomic_write
from appliance.secrets import Secrets
from appliance.settings import Paths, Settings

if TYPE_CHECKING:
    from appliance.services import ProcessStatus, Supervisor

READY_TIMEOUT = 30


@dataclass
class Run:
    """One kind of run: what it converges and how it reports. Built by the recipes."""

    name: str  # "reconfigure", "renew-certs": the summary line's first word
    log_name: str  # its logs' directory under the log dir
    resources: Callable[[Secrets], Iterable[Resource]]
    services: list[Service]
    secrets: Callable[[], Secrets]
    # Resources that need the services running (a Let's Encrypt order needs nginx).
    late_resources: Callable[[Secrets], Iterable[Resource]] | None = None
    preflight: Callable[[], None] | None = None
    intro: Callable[[], list[str]] = lambda: []
    summary: Callable[[Report, float], str] | None = None
    messages: Callable[[Report], Iterable[str]] = lambda report: []
    # A reconfigure starts supervisord and applies program files; a renewal only signals
    # what is running and leaves program changes to the next reconfigure.
    start_services: bool = True
    check_every_service: bool = True  # else only the services this run touched
    say_failure: bool = False  # also print "<name>: failed: ..." (the renewer's log)
    not_running_note: str = "it reads its new files when it starts"


def execute(
    settings: Settings, run: Run, dry_run: bool = False, stream: TextIO = sys.stdout
) -> Report:
    """Run `run` to the end; raise an ApplianceError saying what is not as it should be."""
    paths = settings.paths
    out = RunLog(stream, None if dry_run else paths.log_dir / run.log_name)
    started = time.monotonic()
    lock = (
        reconfigure_lock(paths.lock_file, out)
        if not dry_run or paths.data_dir.exists()
        else _no_lock()
    )
    try:
        for line in run.intro():
            out(line)
        # Before the lock: its file is the first thing a run writes.
        if run.preflight:
            run.preflight()
        listening = None
        if run.start_services:  # a run that only signals what runs binds nothing new
            listening = procfs.ListenTable()
            preflight(settings, run.services, listening)
        with _hangup_ignored(), lock:
            secrets = run.secrets()
            out.redact = redactor(settings, secrets)  # secrets masked in all it prints
            if paths.data_dir.is_dir() and not dry_run:
                from appliance.resources import use_template_cache

                use_template_cache(paths.data_dir / "cache" / "templates")
            journal = Journal(paths.data_dir / "pending-notifications.json", paths)
            engine = Engine(out, dry_run=dry_run, redact=out.redact, before_apply=journal.record)
            report = Report(dry_run=dry_run)
            if not dry_run:
                report.notifications = journal.pending()
                for n in report.notifications:
                    out(f"  {n.action} {n.service}: left pending by an interrupted run")
            # Every resource is built (every template rendered) before the first one is
            # applied: a recipe that refuses a value stops the run with the host untouched.
            report = engine.converge(list(run.resources(secrets)), report)
            crash_point("after-files")
            conductor = Conductor(settings, run, out)
            touched: set[str] = set()
            if dry_run:
                for n in report.notifications:
                    out(f"  would {n.action} {n.service}")
            else:
                touched |= conductor.notify(report.notifications, journal.programs_changed)
                journal.done()
                crash_point("after-notifications")
            if not report.failed and run.late_resources is not None:
                late = Report(dry_run=dry_run)
                engine.converge(run.late_resources(secrets), late)
                if dry_run:
                    for n in late.notifications:
                        out(f"  would {n.action} {n.service}")
                else:
                    touched |= conductor.notify(
                        late.notifications, journal.programs_changed, start=False
                    )
                    journal.done()
                report.outcomes += late.outcomes
                report.notifications = queue(report.notifications, late.notifications)
            elapsed = time.monotonic() - started
            if run.summary:
                out(run.summary(report, elapsed))
            raise_if_failed(report)
            if not dry_run:
                # Sockets as preflight saw them, unless supervisord was asked to change
                # anything since (then they are read again).
                conductor.check(touched, None if conductor.acted else listening)
            for line in run.messages(report):
                out(line)
            return report
    except ApplianceError as exc:
        if run.say_failure:
            out(f"{run.name}: failed: {exc}")
        else:
            out.note(f"{run.name}: failed: {exc}")
        raise
    finally:
        out.save()


def crash_point(name: str) -> None:
    """Where the crash-consistency tests kill a run (APPLIANCE_TEST_CRASH_AT=NAME, or
    NAME:HUP for the hangup of a dropped SSH session). Nothing happens otherwise."""
    wanted = os.environ.get("APPLIANCE_TEST_CRASH_AT")
    if wanted and wanted.split(":")[0] == name:
        os.kill(os.getpid(), signal.SIGHUP if wanted.endswith(":HUP") else signal.SIGKILL)


def hold_point(name: str) -> None:
    """Where the tests hold a run (APPLIANCE_TEST_HOLD_AT=NAME:FILE: wait while FILE
    exists, two minutes at most), so a client can meet a window however fast the run
    is, or two runs meet at the same step; a run arriving here says so with the file
    FILE.arrived.PID. Nothing happens otherwise."""
    wanted = os.environ.get("APPLIANCE_TEST_HOLD_AT", "")
    point, _, path = wanted.partition(":")
    if point != name or not path:
        return
    with contextlib.suppress(OSError):
        Path(f"{path}.arrived.{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@contextmanager
def _no_lock() -> Iterator[None]:
    yield


@contextmanager
def _hangup_ignored() -> Iterator[None]:
    """A dropped SSH session sends SIGHUP: the run goes on to the end rather than stopping
    between writing files and restarting what reads them (its output goes on to its
    log). The main thread only: signal handlers cannot be set elsewhere."""
    try:
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


class Journal:
    """The notifications a run owes, durable before the change that causes them."""

    def __init__(self, path: Path, paths: Paths) -> None:
        self.path = path
        self.programs_dir = str(paths.supervisor_dir) + os.sep
        self.queued: list[Notify] = []
        self.programs_changed = False
        self.written: tuple = ((), False)

    def pending(self) -> list[Notify]:
        """What an interrupted run left undone (and adopt it: it stays owed until done)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        self.queued = [Notify(action, service) for action, service in data.get("notify", [])]
        self.programs_changed = bool(data.get("update"))
        return list(self.queued)

    def record(self, resource: Resource) -> None:
        self.queued = queue(self.queued, resource.notifies)
        if resource.name.startswith(self.programs_dir):
            self.programs_changed = True
        self._write()

    def _write(self) -> None:
        state = (tuple(self.queued), self.programs_changed)
        if state == self.written:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self.path,
            json.dumps(
                {
                    "notify": [[n.action, n.service] for n in self.queued],
                    "update": self.programs_changed,
                }
            ).encode(),
            0o600,
        )
        self.written = state

    def done(self) -> None:
        """The owed notifications ran: nothing is pending any more."""
        self.queued, self.programs_changed = [], False
        self.written = ((), False)
        self.path.unlink(missing_ok=True)


def supervisord_pid(paths: Paths) -> int | None:
    """The pid of this root's live supervisord, None when it does not run."""
    try:
        pid = int((paths.supervisor_dir / "supervisord.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid if paths.supervisor_socket.exists() else None


def stopped_marks(paths: Paths) -> Path:
    """Where `appliance-ctl stop NAME` marks a service the admin stopped on purpose."""
    return paths.supervisor_dir / "stopped"


def stopped_by_admin(paths: Paths) -> set[str]:
    try:
        return set(os.listdir(stopped_marks(paths)))
    except OSError:
        return set()


def mark_stopped(paths: Paths, name: str, stopped: bool) -> None:
    marks = stopped_marks(paths)
    if stopped:
        marks.mkdir(parents=True, exist_ok=True)
        (marks / name).touch()
    else:
        (marks / name).unlink(missing_ok=True)


def sweep_leftovers(paths: Paths, services: Iterable[Service], out: Callable[[str], None]) -> None:
    """Stop the processes of this root that outlived their supervisord, before a new one
    starts its programs on the same ports."""
    pids = procfs.leftovers(paths.supervisor_config, [s.pid_file for s in services if s.pid_file])
    if pids:
        out(
            f"+ stopped {len(pids)} leftover process{'es' * (len(pids) != 1)} of a "
            f"supervisord that is gone (pids {', '.join(map(str, pids))})"
        )
        procfs.stop(pids)


def preflight(
    settings: Settings, services: list[Service], table: procfs.ListenTable | None = None
) -> None:
    """Before anything changes: no stranger on a port a service binds, and every service
    account can reach its files."""
    paths = settings.paths
    table = table or procfs.ListenTable()
    supervisord = supervisord_pid(paths)
    ours = set(procfs.tree(supervisord)) if supervisord else set()
    leftovers: set[int] | None = None
    for service in services:
        if not service.enabled:
            continue
        for address, key in service.binds.items():
            holder = procfs.listener(address, ours, table)
            if holder is None or holder.pid in ours:
                continue
            if leftovers is None:  # scanned once, and only when a port is taken
                leftovers = set(
                    procfs.leftovers(
                        paths.supervisor_config,
                        [s.pid_file for s in services if s.pid_file],
                        spare=ours,
                    )
                )
            if holder.pid in leftovers:
                continue  # ours, stopped before the new supervisord starts
            what = (
                address if address.startswith("/") else f"port {procfs.split_address(address)[1]}"
            )
            raise ServiceError(
                f"{what} ({key}) is used by {holder}; stop that process or "
                f"set another {key} in appliance.yml."
            )
        if settings.facts.run_as_root and service.user:
            for path in service.reaches:
                problem = untraversable(service.user, path)
                if problem:
                    raise ServiceError(
                        f"{problem}: {service.name} needs {path}; make it "
                        f"traversable (chmod o+x) or choose another root."
                    )


def untraversable(user: str, path: Path) -> str | None:
    """'ACCOUNT cannot enter DIR (mode 0700)' for the first directory on the way to `path`
    that `user` may not enter; None when it reaches it (or the account does not exist
    yet and every directory is open to others)."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user)
        uid, groups = (
            entry.pw_uid,
            {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem},
        )
    except KeyError:
        uid, groups = None, set()
    if uid == 0:
        return None
    for directory in [*reversed(path.parents), path]:
        try:
            info = directory.stat()
        except OSError:
            break  # not there yet: reconfigure creates it with its own mode
        if not (info.st_mode & 0o040000):
            break
        if info.st_uid == uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid in groups:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            return f"{user} cannot enter {directory} (mode {info.st_mode & 0o7777:04o})"
    return None


def answers(address: str) -> bool:
    try:
        if address.startswith("/"):
            with socket.socket(socket.AF_UNIX) as unix:
                unix.settimeout(1)
                unix.connect(address)
            return True
        host, port = procfs.split_address(address)
        socket.create_connection((host or "127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def reload_service(
    supervisor: Supervisor, service: Service, signal_name: str | None = None
) -> bool:
    """Send `service` its reload signal (or `signal_name`) and run its contract's wait
    after a reload; False if it was not running (its next start reads the new files)."""
    signal_name = signal_name or service.reload
    [status] = supervisor.status(service.name)
    if not status.running or signal_name is None:
        return False
    wait = service.wait_after_reload(status.pid) if service.wait_after_reload else None
    if not supervisor.signal(service.name, signal_name):
        return False
    crash_point("mid-reload")
    if wait is not None:
        wait()
    return True


class Conductor:
    """Drives supervisord by the services' contracts: notifications, then the check."""

    def __init__(self, settings: Settings, run: Run, out: Callable[[str], None]) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.run = run
        self.out = out
        self.services = {s.name: s for s in run.services}
        self._supervisor: Supervisor | None = None
        self.since: dict[str, int] = {}
        self.acted = False  # did this run ask supervisord for anything

    @property
    def supervisor(self) -> Supervisor:
        if self._supervisor is None:
            from appliance.services import Supervisor

            self._supervisor = Supervisor(
                self.paths.supervisor_config, self.paths.supervisor_socket
            )
        return self._supervisor

    def _mark_logs(self, names: Iterable[str]) -> None:
        from appliance.services import log_size

        for name in names:
            service = self.services.get(name)
            if service and service.log and name not in self.since:
                self.since[name] = log_size(service.log)

    def notify(
        self, notifications: list[Notify], programs_changed: bool, start: bool = True
    ) -> set[str]:
        """Bring supervisord in line with the program files, then run the queue once;
        the names of the services started, restarted or reloaded.

        A program that supervisord has just started (because supervisord itself was
        started, or because its program file was added or changed) already runs the new
        files, so a queued restart or reload of it is skipped rather than done twice.
        """
        start = start and self.run.start_services
        if not notifications and not programs_changed and supervisord_pid(self.paths):
            return set()  # nothing to start, add, remove or signal: not even a question
        self.acted = True
        supervisor = self.supervisor
        fresh: set[str] = set()
        removed: set[str] = set()
        running = supervisor.is_running()
        if start and not running:
            sweep_leftovers(self.paths, self.services.values(), self.out)
            self._mark_logs(self.services)
            supervisor.ensure_running()
            self.out("+ supervisord (started)")
            fresh = {p.name for p in supervisor.status()}
            running = True
        if running and self.run.start_services:
            self._mark_logs(self.services)
            changes = supervisor.update()
            for verb in ("added", "changed", "removed"):
                for name in changes.get(verb, []):
                    self.out(
                        f"+ service {name} ({verb}{' and started' if verb != 'removed' else ''})"
                    )
            fresh |= set(changes.get("added", [])) | set(changes.get("changed", []))
            removed = set(changes.get("removed", []))
        touched = fresh - removed
        held = stopped_by_admin(self.paths)
        for n in notifications:
            if n.service in fresh or n.service in removed:
                continue
            if n.service in held:
                self.out(
                    f"  service {n.service} stays stopped (appliance-ctl stop); it reads "
                    f"its new files when started"
                )
                continue
            service = self.services.get(n.service, Service(n.service))
            if not running:
                self.out(f"  service {n.service} is not running; {self.run.not_running_note}")
                continue
            if n.action == "reload" and service.reloads_by_signal:
                if self.reload(service):
                    self.out(f"+ service {n.service} (reloaded)")
                    touched.add(n.service)
                else:
                    self.out(f"  service {n.service} is not running; {self.run.not_running_note}")
            elif service.graceful_restart and self.reload(service, service.graceful_restart):
                self.out(f"+ service {n.service} (restarted by {service.graceful_restart})")
                touched.add(n.service)
            else:
                self._mark_logs([n.service])
                supervisor.stop(n.service)
                crash_point("mid-restart")
                self._start(n.service)
                touched.add(n.service)
                self.out(f"+ service {n.service} (restarted)")
        return touched

    def reload(self, service: Service, signal_name: str | None = None) -> bool:
        return reload_service(self.supervisor, service, signal_name)

    def _start(self, name: str) -> None:
        """Start `name`; when it fails, say why with what its log got since this start
        (supervisord's own fault names only the state)."""
        try:
            self.supervisor.start(name)
        except ServiceError:
            self.supervisor.wait_until_running([name], timeout=10, since=self.since)

    def check(self, touched: set[str], table: procfs.ListenTable | None = None) -> None:
        """Every service this run must leave serving is RUNNING and answers on its ready
        address from its own process tree; start those stopped by accident (not by an
        admin's `appliance-ctl stop`), then say which are not, with their real error."""
        if self.run.check_every_service:
            held = stopped_by_admin(self.paths)
            wanted = [s for s in self.services.values() if s.enabled and s.name not in held]
            for name in sorted(held & {s.name for s in self.services.values() if s.enabled}):
                self.out(
                    f"  service {name} stays stopped (appliance-ctl stop); "
                    f"appliance-ctl start {name} starts it"
                )
        else:
            wanted = [self.services.get(name, Service(name)) for name in sorted(touched)]
        if touched:  # started or restarted by supervisord: RUNNING only after startsecs
            self.supervisor.wait_until_running(sorted(touched), since=self.since)
        if not wanted or self._all_serving_fast(wanted, table or procfs.ListenTable()):
            return
        supervisor = self.supervisor
        statuses = {s.name: s for s in supervisor.status()}
        for service in wanted:
            status = statuses.get(service.name)
            if status is not None and status.state in ("STOPPED", "EXITED", "FATAL"):
                self._mark_logs([service.name])
                self._start(service.name)
                self.out(f"+ service {service.name} (started: it was {status.state.lower()})")
        supervisor.wait_until_running([s.name for s in wanted], since=self.since)
        self.wait_answering(wanted, {s.name: s for s in supervisor.status()})

    def _all_serving_fast(self, wanted: list[Service], table: procfs.ListenTable) -> bool:
        """The no-op path, from /proc alone (no supervisord round trip, no XML-RPC
        import): each service's ready address is held by supervisord's tree and answers,
        and a service without one runs as a child of supervisord carrying its name."""
        pid = supervisord_pid(self.paths)
        if pid is None:
            return False
        ours = procfs.tree(pid)
        named = None
        for service in wanted:
            if service.ready:
                holder = procfs.listener(service.ready, ours, table)
                if holder is None or holder.pid not in ours or not answers(service.ready):
                    return False
            else:
                if named is None:
                    named = {
                        procfs.environment(child).get(SERVICE_MARKER)
                        for child in procfs.children(pid)
                    }
                if service.name not in named:
                    return False
        return True

    def wait_answering(
        self,
        wanted: list[Service],
        statuses: dict[str, ProcessStatus],
        timeout: float = READY_TIMEOUT,
    ) -> None:
        deadline = time.monotonic() + timeout
        for service in wanted:
            if not service.ready:
                continue
            status = statuses[service.name]
            while True:
                ours = procfs.tree(status.pid)
                holder = procfs.listener(service.ready, ours)
                if holder is not None and holder.pid not in ours:
                    key = service.binds.get(service.ready, "its address")
                    raise ServiceError(
                        f"{service.name} does not answer on {service.ready}: "
                        f"{holder} holds it; stop that process or set another "
                        f"{key} in appliance.yml."
                    )
                if holder is not None and answers(service.ready):
                    break
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{service.name} runs but does not accept connections "
                        f"on {service.ready}; see appliance-ctl tail "
                        f"{service.name}."
                    )
                time.sleep(0.05)
