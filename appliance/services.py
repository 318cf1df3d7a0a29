"""Control of the supervised services through supervisord's XML-RPC API.

supervisord owns every long-running process (nginx, registry, auth). We talk to it over
its unix socket with the `supervisor` package's own transport instead of shelling out
to supervisorctl: faults arrive as codes we can act on, not as text to parse. Faults
that mean "already in the wanted state" (ALREADY_STARTED, NOT_RUNNING) are nothing to
do, so every operation here is safe to repeat.
"""

from __future__ import annotations

import codecs
import http.client
import os
import re
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from supervisor.xmlrpc import Faults, SupervisorTransport

from appliance.errors import ServiceError
from appliance.settings import UNIX_PATH_MAX

# The packaged unit that runs supervisord on a systemd host (packaging/).
SYSTEMD_UNIT = "appliance-runsvdir.service"
TAIL_INITIAL_BYTES = 8192
TAIL_POLL_SECONDS = 0.5


class UnknownServiceError(ServiceError):
    """A service name that supervisord does not supervise."""

    exit_code = 2  # a usage error: the command line names something that does not exist


class SupervisorNotRunningError(ServiceError):
    """supervisord's socket does not answer."""

    exit_code = 3  # LSB "program is not running"


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    state: str  # supervisord's state name: RUNNING, STOPPED, STARTING, BACKOFF, FATAL, ...
    pid: int  # 0 when not running
    uptime: int  # seconds since start, 0 when not running
    description: str

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    def line(self) -> str:
        """One status line in runit's shape (`run: registry: (pid 4242) 310s`), as
        Omnibus operators read it; scripts test the exit code, not this text."""
        if self.running:
            return f"run: {self.name}: (pid {self.pid}) {self.uptime}s"
        return f"down: {self.name}: {self.state.lower()}; {self.description}".rstrip("; ")


class Supervisor:
    """supervisord for one appliance root: its config file and its control socket."""

    def __init__(self, config_path: Path, socket_path: Path) -> None:
        self.config_path = Path(config_path)
        self.socket_path = Path(socket_path)

    # -- supervisord itself -------------------------------------------------------------

    def _server(self) -> xmlrpc.client.ServerProxy:
        if len(os.fsencode(self.socket_path)) > UNIX_PATH_MAX:
            raise ServiceError(
                f"The supervisord socket path {self.socket_path} is longer than "
                f"{UNIX_PATH_MAX} bytes, the limit of a unix socket; use a shorter root."
            )
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        # The host part is ignored: the transport always dials the unix socket.
        return xmlrpc.client.ServerProxy("http://localhost", transport=transport)

    def _call(self, method: str, *args: object) -> object:
        """Call `supervisor.<method>`; unreachable supervisord becomes one clear error."""
        server = self._server()
        try:
            return getattr(server.supervisor, method)(*args)
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise SupervisorNotRunningError(
                "supervisord is not running; run appliance-ctl reconfigure."
            ) from error
        except PermissionError as error:
            raise ServiceError(
                f"Permission denied on the supervisord socket {self.socket_path}; "
                "run this command as the user that runs the appliance."
            ) from error
        except (http.client.HTTPException, OSError) as error:
            raise SupervisorNotRunningError(
                f"supervisord at {self.socket_path} did not answer ({error}); "
                "run appliance-ctl reconfigure."
            ) from error
        finally:
            server("close")()

    def is_running(self) -> bool:
        try:
            self._call("getState")
        except SupervisorNotRunningError:
            return False
        return True

    def ensure_running(self, timeout: float = 10) -> bool:
        """Start supervisord unless it answers already; True if this call started it.

        supervisord is launched from the embedded virtualenv with a minimal environment,
        so the services do not inherit whatever shell happened to run reconfigure.
        """
        if self.is_running():
            return False
        unit = self.systemd_unit()
        if unit is not None:
            self._systemctl("start", unit, timeout)
            self._wait_for_socket(timeout)
            return True
        supervisord = Path(sys.prefix) / "bin" / "supervisord"
        environment = {
            "PATH": f"{Path(sys.prefix) / 'bin'}:/usr/local/sbin:/usr/local/bin:"
            "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }
        # supervisord binds its socket before it daemonizes, so its exit status tells
        # whether it came up; the wait below covers the socket becoming connectable.
        result = subprocess.run(
            [str(supervisord), "-c", str(self.config_path)],
            env=environment,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            raise ServiceError(
                f"supervisord did not start with {self.config_path}: "
                f"{message[-1] if message else f'exit status {result.returncode}'}."
            )
        self._wait_for_socket(timeout)
        return True

    def _wait_for_socket(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"supervisord started but its socket {self.socket_path} did not answer "
                    f"within {timeout:g}s."
                )
            time.sleep(0.05)

    def systemd_unit(self) -> str | None:
        """The packaged systemd unit, when systemd runs this host and the unit runs
        supervisord on this very config; None otherwise (temporary roots, containers).

        supervisord must then be started and stopped through systemd: one started beside
        the unit would hold the socket the unit's own supervisord needs (a restart loop),
        and one shut down behind systemd's back would be restarted by it.
        """
        if not Path("/run/systemd/system").is_dir():
            return None
        try:
            result = subprocess.run(
                ["systemctl", "cat", SYSTEMD_UNIT], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if result.returncode != 0 or f" -c {self.config_path}\n" not in result.stdout:
            return None
        return SYSTEMD_UNIT

    def _systemctl(self, action: str, unit: str, timeout: float) -> None:
        result = subprocess.run(
            ["systemctl", action, unit], capture_output=True, text=True, timeout=max(timeout, 120)
        )
        if result.returncode != 0:
            raise ServiceError(
                f"systemctl {action} {unit} failed: "
                f"{result.stderr.strip() or result.returncode}; see "
                f"journalctl -u {unit}."
            )

    def shutdown(self, timeout: float = 30) -> None:
        """Stop every service, then supervisord; nothing to do if it is not running."""
        unit = self.systemd_unit()
        if unit is not None and self.is_running():
            self._systemctl("stop", unit, timeout)
            return
        pid = None
        try:
            pid = int(self._call("getPID"))  # type: ignore[arg-type]
            self._call("shutdown")
        except SupervisorNotRunningError:
            return
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != Faults.SHUTDOWN_STATE:  # already on its way out: wait
                raise ServiceError(
                    f"supervisord refused to shut down: {fault.faultString}."
                ) from fault
        deadline = time.monotonic() + timeout
        while _process_exists(pid) if pid else self.is_running():
            if time.monotonic() > deadline:
                raise ServiceError(f"supervisord did not exit within {timeout:g}s.")
            time.sleep(0.05)

    def update(self) -> dict[str, list[str]]:
        """Apply changed program files the way `supervisorctl update` does.

        Added programs are started (when autostart), removed ones stopped, and a
        program whose definition changed is stopped and started with the new one.
        """
        try:
            [[added, changed, removed]] = self._call("reloadConfig")  # type: ignore[misc]
        except xmlrpc.client.Fault as fault:
            raise ServiceError(
                f"supervisord cannot reload its configuration: {fault.faultString}."
            ) from fault
        for name in removed:
            self._stop_group(name)
            self._call("removeProcessGroup", name)
        for name in changed:
            self._stop_group(name)
            self._call("removeProcessGroup", name)
            self._add_group(name)
        for name in added:
            self._add_group(name)
        return {"added": sorted(added), "changed": sorted(changed), "removed": sorted(removed)}

    def _stop_group(self, name: str) -> None:
        try:
            self._call("stopProcessGroup", name)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != Faults.BAD_NAME:
                raise self._error("stop", name, fault) from fault

    def _add_group(self, name: str) -> None:
        try:
            self._call("addProcessGroup", name)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != Faults.ALREADY_ADDED:
                raise self._error("add", name, fault) from fault

    # -- one service --------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every supervised service, sorted."""
        return sorted(info["name"] for info in self._call("getAllProcessInfo"))  # type: ignore[union-attr]

    def _known(self, name: str) -> str:
        names = self.names()
        if name not in names:
            raise UnknownServiceError(
                f"Unknown service {name!r}; valid services: {', '.join(names) or 'none'}."
            )
        return name

    def _error(self, action: str, name: str, fault: xmlrpc.client.Fault) -> ServiceError:
        if fault.faultCode == Faults.BAD_NAME:
            return UnknownServiceError(
                f"Unknown service {name!r}; valid services: {', '.join(self.names())}."
            )
        where = ""
        try:
            log = Path(self._call("getProcessInfo", name)["stdout_logfile"])  # type: ignore[index]
            last = _last_line(log)
            where = f"; its log {log} ends with: {last}" if last else f"; see {log}"
        except (xmlrpc.client.Fault, TypeError, OSError):
            pass
        return ServiceError(f"Cannot {action} {name}: {fault.faultString}{where}")

    def start(self, name: str) -> None:
        """Start `name` and wait until supervisord deems it running (its startsecs)."""
        try:
            self._call("startProcess", self._known(name))
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != Faults.ALREADY_STARTED:
                raise self._error("start", name, fault) from fault

    def stop(self, name: str) -> None:
        try:
            self._call("stopProcess", self._known(name))
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != Faults.NOT_RUNNING:
                raise self._error("stop", name, fault) from fault

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def signal(self, name: str, signal: str) -> bool:
        """Send `signal` ("HUP", "USR1", ...) to `name`; False if it is not running.

        A reload of a stopped service has nothing to reload: its next start reads the
        new configuration anyway.
        """
        try:
            self._call("signalProcess", self._known(name), signal)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode == Faults.NOT_RUNNING:
                return False
            raise self._error(f"send {signal} to", name, fault) from fault
        return True

    def status(self, name: str | None = None) -> list[ProcessStatus]:
        """Status of `name`, or of every service sorted by name."""
        if name is None:
            infos = self._call("getAllProcessInfo")
        else:
            try:
                infos = [self._call("getProcessInfo", self._known(name))]
            except xmlrpc.client.Fault as fault:
                raise self._error("read the status of", name, fault) from fault
        return sorted((_status(info) for info in infos), key=lambda s: s.name)  # type: ignore[union-attr]

    def wait_until_running(
        self, names: Iterable[str], timeout: float = 30, since: dict[str, int] | None = None
    ) -> None:
        """Return once every named service is RUNNING (up for its startsecs); raise a
        ServiceError naming each one that is not, with the first error line its log got
        since `since` (log sizes taken before the start), else the last line of its log.

        supervisord starts an added program in the background; this is how a caller
        (reconfigure) learns that a new config actually came up.
        """
        wanted = sorted(set(names))
        deadline = time.monotonic() + timeout
        while True:
            statuses = {s.name: s for s in self.status() if s.name in wanted}
            down = [n for n in wanted if n not in statuses or not statuses[n].running]
            given_up = [n for n in down if n in statuses and statuses[n].state == "FATAL"]
            if not down:
                return
            if given_up or time.monotonic() > deadline:
                problems = []
                for name in given_up or down:
                    state = statuses[name].state.lower() if name in statuses else "not supervised"
                    try:
                        log = self.log_path(name)
                        last = first_error_line(log, (since or {}).get(name)) or _last_line(log)
                    except (ServiceError, OSError):
                        last = ""
                    problems.append(f"{name} is {state}" + (f" ({last})" if last else ""))
                raise ServiceError("Not running: " + "; ".join(problems) + ".")
            time.sleep(0.1)

    def log_path(self, name: str) -> Path:
        info = self._call("getProcessInfo", self._known(name))
        if not info["stdout_logfile"]:  # type: ignore[index]
            raise ServiceError(f"{name} has no log file.")
        return Path(info["stdout_logfile"])  # type: ignore[index]

    def tail(self, name: str | None = None, follow: bool = False) -> Iterator[str]:
        """The end of `name`'s log (every service's when None), then, with `follow`,
        new text as it is written, until the caller stops iterating.

        Reads the log files themselves rather than supervisord's tail API, so a size
        rotation (supervisord renames `current` to `current.1`) is noticed by the inode
        changing: the rest of the old file is read, then the new one from its start.
        Several services are told apart by `==> name <==` headers, as tail(1) does.
        """
        names = [self._known(name)] if name is not None else self.names()
        followers = [_LogFollower(n, self.log_path(n)) for n in names]
        shown = None
        try:
            for follower in followers:
                text = follower.start()
                if len(followers) > 1:
                    separator = "" if shown is None else "\n"  # a blank line, as tail(1)
                    yield f"{separator}==> {follower.name} <==\n"
                    shown = follower.name
                yield text
            while follow:
                time.sleep(TAIL_POLL_SECONDS)
                for follower in followers:
                    text = follower.read_new()
                    if not text:
                        continue
                    if len(followers) > 1 and shown != follower.name:
                        yield f"\n==> {follower.name} <==\n"
                        shown = follower.name
                    yield text
        finally:
            for follower in followers:
                follower.close()


class _LogFollower:
    """One service log followed by inode, decoded incrementally (a UTF-8 character
    split across two writes is never mangled)."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.handle: BinaryIO | None = None
        self.inode: int | None = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _open(self) -> None:
        try:
            self.handle = open(self.path, "rb")
        except FileNotFoundError:
            self.handle, self.inode = None, None
            return
        self.inode = os.fstat(self.handle.fileno()).st_ino
        self.decoder.reset()

    def start(self) -> str:
        """The last TAIL_INITIAL_BYTES of the log, from a line start."""
        self._open()
        if self.handle is None:
            return ""
        size = os.fstat(self.handle.fileno()).st_size
        self.handle.seek(max(0, size - TAIL_INITIAL_BYTES))
        data = self.handle.read()
        if size > TAIL_INITIAL_BYTES:
            data = data.split(b"\n", 1)[-1]
        return self.decoder.decode(data)

    def read_new(self) -> str:
        text = ""
        try:
            rotated = self.path.stat().st_ino != self.inode
        except FileNotFoundError:
            rotated = False  # between supervisord's rename and its new file
        if rotated:
            if self.handle is not None:
                text = self.decoder.decode(self.handle.read(), final=True)
                self.handle.close()
            self._open()
        if self.handle is not None:
            text += self.decoder.decode(self.handle.read())
        return text

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _last_line(log: Path, limit: int = 300) -> str:
    """The last non-empty line of a log: usually the reason a program would not start."""
    with open(log, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - 4096))
        lines = [
            line for line in handle.read().decode(errors="replace").splitlines() if line.strip()
        ]
    return lines[-1].strip()[:limit] if lines else ""


ERROR_WORDS = re.compile(
    r"\b(error|fatal|panic|failed|cannot|can't|unable|refused|denied|"
    r"invalid|not found|no such|emerg|crit|unknown)\b",
    re.IGNORECASE,
)


def log_size(log: Path) -> int:
    """Where a log ends now: the `since` of a start about to happen."""
    try:
        return log.stat().st_size
    except OSError:
        return 0


def first_error_line(log: Path, since: int | None, limit: int = 300) -> str:
    """The first line that reads as an error among those written since offset `since`
    (the last 8 KiB when None), else the first non-empty one: a program that cannot start
    says why first and prints its usage text after (the registry's `serve -h` lines)."""
    with open(log, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        start = max(0, size - 8192) if since is None or since > size else since
        handle.seek(start)
        text = handle.read(65536).decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if start and since is None and lines:
        lines = lines[1:]  # the first may be cut
    first = next((line for line in lines if ERROR_WORDS.search(line)), lines[0] if lines else "")
    return first[:limit]


def _status(info: dict) -> ProcessStatus:
    running = info["statename"] == "RUNNING"
    return ProcessStatus(
        name=info["name"],
        state=info["statename"],
        pid=info["pid"] if running else 0,
        uptime=max(0, info["now"] - info["start"]) if running else 0,
        description=info["description"] if not running else "",
    )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists" for kill(); reap it if it is ours.
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return reaped == 0
