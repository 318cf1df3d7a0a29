"""`python -m appliance.programs.registry PROGRAM_JSON`: the registry's supervised
program, a wrapper that runs `docker-registry serve` as its child and hands it over.

Distribution 2.8 cannot reload its config, and a restart refuses requests and cuts
transfers in flight. So on SIGHUP this wrapper hands the registry over to a new child
instead, with no request refused:

1. a standby child on the new config starts on the standby socket and answers;
2. the old child retires: for a unix socket its path is unlinked first, so new
   connections go to the standby, and nginx's idle connections to it expire (nginx
   closes an upstream connection after `keepalive_time`, an idle one after
   `keepalive_timeout`: settle_seconds covers both) before it is told to stop; then TERM,
   and Go's Shutdown lets the transfers in flight finish (`http.draintimeout`);
3. once it is gone, a new child starts on the configured address and answers;
4. the standby retires the same way.

nginx's upstream lists the configured address and, as a backup, the standby socket with
`max_fails=0`: a connection refused (or a socket path gone) on one is passed to the
other, before a byte of the request was sent, so even an upload is not refused. Both
children share the storage and the http secret, so an upload session started on one is
finished on the other.

Everything a child prints passes, line by line, through a filter that masks every
configured secret (notification headers, storage keys, http.secret, secret-looking
registry.env values) before it reaches supervisord's log: Distribution logs each
notification endpoint with its headers at start.

A maintenance window (appliance.registry_maintenance: a garbage collection) is read
from its marker whenever a child starts: while it is open, children run the read-only
variant of the config (`storage.maintenance.readonly`), so opening and closing a window
is a handover like any other (the collection writes the marker, then sends the HUP).
Every second the wrapper also looks whether a read-only child still has a window to
serve: when the window's owner is gone (a collection killed with kill -9), or its marker
was removed, it hands itself back to read-write without waiting for anyone.

Progress is written to a state file that `recipes.registry.wait_handed_over` reads:
`requested` counts the HUPs taken, `completed` the last one handed over (or failed,
with `error`), `readonly` whether every live child serves read-only (written as soon as
a child starts, so a collection watching it stops before a read-write child serves).
TERM stops every child gracefully; a child gets TERM too should the wrapper die
(PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance import registry_maintenance
from appliance.services import ERROR_WORDS

MASK = "********"
MASK_ANYWHERE_LENGTH = 8
READY_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1
WINDOW_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class Program:
    """What the recipe wrote for the wrapper (program.json), re-read at every HUP."""

    command: list[str]
    primary: str  # host:port, or a socket path
    standby: str | None  # a socket path; None when the root is too deep for one
    environment: dict[str, str]
    secrets: list[str]
    drain_seconds: int
    # How long nginx may still hold an idle connection to a child whose socket path is
    # gone (recipes.registry.SETTLE_SECONDS, from the upstream keepalive it renders):
    # stopping the child after that cannot race a request nginx sends on one.
    settle_seconds: float
    state_file: Path
    # The read-only variant of the command (the same config plus
    # storage.maintenance.readonly), run while a maintenance window is open, and the
    # window's marker (appliance.registry_maintenance). None in a program.json written
    # before garbage collection existed: such a wrapper never serves read-only.
    readonly_command: list[str] | None = None
    maintenance_file: Path | None = None

    @classmethod
    def load(cls, path: Path) -> Program:
        raw = json.loads(path.read_text())
        return cls(
            command=list(raw["command"]),
            primary=raw["primary"],
            standby=raw.get("standby"),
            environment=dict(raw["environment"]),
            secrets=list(raw["secrets"]),
            drain_seconds=int(raw["drain_seconds"]),
            settle_seconds=float(raw["settle_seconds"]),
            state_file=Path(raw["state_file"]),
            readonly_command=list(raw["readonly_command"]) if raw.get("readonly_command") else None,
            maintenance_file=Path(raw["maintenance_file"]) if raw.get("maintenance_file") else None,
        )


class SecretFilter:
    """Masks every configured secret in a log line: anywhere when it is long enough not
    to collide with ordinary text, else only as a whole word."""

    def __init__(self, secrets: list[str]) -> None:
        values = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.anywhere = [v for v in values if len(v) >= MASK_ANYWHERE_LENGTH]
        short = [re.escape(v) for v in values if len(v) < MASK_ANYWHERE_LENGTH]
        # A whole word: not part of a longer word, number, address or name (10.0.0.1).
        self.words = (
            re.compile(r"(?<![\w.:/-])(" + "|".join(short) + r")(?![\w.:/-])") if short else None
        )

    def __call__(self, line: str) -> str:
        for value in self.anywhere:
            line = line.replace(value, MASK)
        if self.words is not None:
            line = self.words.sub(MASK, line)
        return line


def _parent_death_signal() -> None:
    """In the child, before exec: TERM it when the wrapper dies, so it never outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def answers(address: str, timeout: float = 1.0) -> bool:
    """Whether an HTTP server answers GET /v2/ at `address` (any status will do)."""
    try:
        if address.startswith("/"):
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(timeout)
            conn.connect(address)
        else:
            host, _, port = address.rpartition(":")
            host = "127.0.0.1" if host in ("", "0.0.0.0", "localhost") else host.strip("[]")
            host = "::1" if host == "::" else host
            conn = socket.create_connection((host, int(port)), timeout=timeout)
        with conn:
            conn.sendall(b"GET /v2/ HTTP/1.0\r\nHost: registry\r\n\r\n")
            return conn.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


@dataclass
class Child:
    process: subprocess.Popen
    address: str
    retire_at: float | None = None  # when it is due for TERM
    unlink_at: float | None = None  # when its socket path goes (new connections stop)
    stopping: bool = False
    # The first line it printed that reads as an error: why it would not start, said by
    # the run that asked for the handover (its usage text follows it in the log).
    first_error: str | None = None
    readonly: bool = False  # started on the read-only config (a maintenance window)


@dataclass
class Wrapper:
    program_path: Path
    program: Program
    children: list[Child] = field(default_factory=list)
    requested: int = 0
    completed: int = 0
    stop_requested: bool = False
    window_checked: float = 0.0
    phase: str = "starting"
    output_lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------ output and state
    def say(self, line: str) -> None:
        with self.output_lock:
            sys.stdout.write(f"registry-handover: {line}\n")
            sys.stdout.flush()

    def write_state(self, phase: str, error: str | None = None) -> None:
        self.phase = phase
        live = [c for c in self.children if c.process.poll() is None]
        state = {
            "requested": self.requested,
            "completed": self.completed,
            "phase": phase,
            "error": error,
            "pid": os.getpid(),
            "children": {c.address: c.process.pid for c in live},
            # Every live child serves read-only: what a garbage collection waits for
            # before it starts, and watches while it runs.
            "readonly": bool(live) and all(c.readonly for c in live),
        }
        path = self.program.state_file
        temporary = path.with_name(path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(state) + "\n")
            os.replace(temporary, path)
        except OSError as error_:
            self.say(f"cannot write {path}: {error_.strerror}")

    def _pump(self, stream, mask: SecretFilter, child: Child) -> None:  # noqa: ANN001
        for raw in iter(stream.readline, b""):
            line = mask(raw.decode("utf-8", "replace").rstrip("\n"))
            if child.first_error is None and ERROR_WORDS.search(line):
                child.first_error = line.strip()[:300]
            with self.output_lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        stream.close()

    # ------------------------------------------------------------ children
    def window_open(self) -> bool:
        """A maintenance window is open and its owner lives: children start read-only."""
        path = self.program.maintenance_file
        return (
            path is not None
            and self.program.readonly_command is not None
            and registry_maintenance.state_of(path) == registry_maintenance.OPEN
        )

    def check_window(self) -> None:
        """Serving read-only with no window in force any more (its owner was killed, or
        the marker removed): hand over to read-write without waiting for anyone. The
        owner closing its window sends the HUP itself (the marker says `closing`)."""
        now = time.monotonic()
        if (
            now - self.window_checked < WINDOW_CHECK_SECONDS
            or self.program.maintenance_file is None
        ):
            return
        self.window_checked = now
        serving = [c for c in self.children if c.retire_at is None]
        if not any(c.readonly for c in serving):
            return
        window = registry_maintenance.read(self.program.maintenance_file)
        status = registry_maintenance.state(window)
        if status in (registry_maintenance.ABSENT, registry_maintenance.STALE):
            why = (
                f"its owner (pid {window.pid}) is gone"
                if window is not None
                else "its marker was removed"
            )
            self.say(f"the maintenance window is over ({why}): handing over to read-write")
            self.requested += 1

    def start_child(self, address: str) -> Child:
        p = self.program
        readonly = self.window_open()
        env = dict(os.environ)
        env.update(p.environment)
        env["REGISTRY_HTTP_DRAINTIMEOUT"] = f"{p.drain_seconds}s"
        env["REGISTRY_HTTP_ADDR"] = address
        env["REGISTRY_HTTP_NET"] = "unix" if address.startswith("/") else "tcp"
        if address == p.standby:
            # Two children cannot share the debug address (2.8 exits when it cannot bind
            # it): the standby serves registry requests only.
            env["REGISTRY_HTTP_DEBUG_ADDR"] = ""
        process = subprocess.Popen(
            p.readonly_command if readonly and p.readonly_command else p.command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_parent_death_signal,
        )  # noqa: PLW1509
        child = Child(process, address, readonly=readonly)
        if readonly:
            self.say(f"pid {process.pid} on {address} serves read-only (maintenance window)")
        threading.Thread(
            target=self._pump, args=(process.stdout, SecretFilter(p.secrets), child), daemon=True
        ).start()
        self.children.append(child)
        # At once, not when the handover ends: a garbage collection watching for a child
        # that is not read-only must see it before it serves a request.
        self.write_state(self.phase)
        return child

    def wait_ready(self, child: Child) -> str | None:
        """None once the child answers, else why not (it exited, or never answered)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self.stop_requested:
            code = child.process.poll()
            if code is not None:
                time.sleep(0.1)  # its last lines reach the pump
                why = f" ({child.first_error})" if child.first_error else ""
                return f"the registry exited with status {code} on {child.address}{why}"
            if answers(child.address):
                return None
            time.sleep(0.05)
        child.process.kill()
        return f"the registry did not answer on {child.address} within {READY_TIMEOUT:.0f} s"

    def retire(self, child: Child, after: float = 0) -> None:
        """Stop sending it requests (in `after` seconds); TERM it once nginx can hold no
        idle connection to it."""
        if child.address.startswith("/"):
            child.unlink_at = time.monotonic() + after
            child.retire_at = child.unlink_at + self.program.settle_seconds
        else:
            child.retire_at = time.monotonic() + after  # a TCP listener closes with TERM
        self.tick()

    def tick(self) -> int | None:
        """TERM the children due for it, forget the ones gone; the exit status of a
        serving child that died (the wrapper then exits and supervisord restarts it)."""
        for child in list(self.children):
            code = child.process.poll()
            if code is not None:
                self.children.remove(child)
                if child.retire_at is None and not self.stop_requested:
                    self.say(f"the registry on {child.address} exited with status {code}")
                    return code or 1
                continue
            if child.unlink_at is not None and time.monotonic() >= child.unlink_at:
                try:
                    os.unlink(child.address)
                except FileNotFoundError:
                    pass
                child.unlink_at = None
            if (
                child.retire_at is not None
                and not child.stopping
                and time.monotonic() >= child.retire_at
            ):
                child.process.send_signal(signal.SIGTERM)
                child.stopping = True
        return None

    def wait_gone(self, child: Child) -> None:
        deadline = (child.retire_at or time.monotonic()) + self.program.drain_seconds + 5
        while child.process.poll() is None:
            self.tick()
            if time.monotonic() > deadline:
                child.process.kill()
            time.sleep(0.05)
        self.tick()

    # ------------------------------------------------------------ the handover
    def hand_over(self) -> None:
        taken = self.requested
        self.write_state("handing over")
        try:
            self.program = Program.load(self.program_path)
        except (OSError, ValueError, KeyError) as error:
            self._failed(taken, f"cannot read {self.program_path}: {error}")
            return
        p = self.program
        if p.standby is None:
            self.replace_in_place(taken)
            return
        stranded = [c for c in self.children if c.address == p.standby and c.retire_at is None]
        if stranded:
            self.back_to_primary(taken, stranded[0])
            return
        for child in [c for c in self.children if c.address == p.standby]:
            self.wait_gone(child)  # a standby still draining holds the standby path
        standby = self.start_child(p.standby)
        problem = self.wait_ready(standby)
        if problem:
            self.wait_gone(standby)
            self._failed(taken, f"{problem}; the running registry is kept (see its log)")
            return
        os.chmod(p.standby, 0o660)  # nginx's workers (the directory's group) connect to it
        moved = False
        for old in [c for c in self.children if c.retire_at is None and c is not standby]:
            moved = moved or old.address != p.primary
            self.retire(old)
            self.wait_gone(old)
        primary = self.start_child(p.primary)
        problem = self.wait_ready(primary)
        if problem:
            self.wait_gone(primary)
            self._failed(taken, f"{problem}; the registry serves on {p.standby} only")
            return
        # A new address reaches nginx with its reload, which follows this handover: the
        # standby keeps taking requests meanwhile.
        self.retire(standby, after=self.program.settle_seconds if moved else 0)
        self.completed = taken
        self.write_state("serving")
        self.say(f"handed over to pid {primary.process.pid} on {p.primary}")

    def back_to_primary(self, taken: int, standby: Child) -> None:
        """After a handover whose last step failed, the standby serves alone: a new
        registry on the primary address relieves it."""
        primary = self.start_child(self.program.primary)
        problem = self.wait_ready(primary)
        if problem:
            self.wait_gone(primary)
            self._failed(taken, f"{problem}; the registry serves on {standby.address} only")
            return
        self.retire(standby)
        self.completed = taken
        self.write_state("serving")
        self.say(f"handed over to pid {primary.process.pid} on {self.program.primary}")

    def replace_in_place(self, taken: int) -> None:
        """Without a standby socket: drain the old process, then start the new one on
        the same address (requests in between are refused)."""
        for old in [c for c in self.children if c.retire_at is None]:
            self.retire(old)
            self.wait_gone(old)
        primary = self.start_child(self.program.primary)
        problem = self.wait_ready(primary)
        if problem:
            self._failed(taken, problem)
            return
        self.completed = taken
        self.write_state("serving")
        self.say(f"replaced in place by pid {primary.process.pid} on {self.program.primary}")

    def _failed(self, taken: int, error: str) -> None:
        self.completed = taken
        self.say(f"handover failed: {error}")
        self.write_state("failed", error)

    # ------------------------------------------------------------ the main loop
    def stop(self) -> int:
        for child in self.children:
            child.retire_at = min(child.retire_at or time.monotonic(), time.monotonic())
        for child in list(self.children):
            self.wait_gone(child)
        return 0

    def run(self) -> int:
        def on_hup(signum: int, frame: object) -> None:
            self.requested += 1

        def on_term(signum: int, frame: object) -> None:
            self.stop_requested = True

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        first = self.start_child(self.program.primary)
        self.write_state("starting")
        problem = self.wait_ready(first)
        if problem and not self.stop_requested:
            self.say(problem)
            self.stop()
            return 1
        self.completed = self.requested
        self.write_state("serving")
        while not self.stop_requested:
            code = self.tick()
            if code is not None:
                self.stop_requested = True
                self.stop()
                return code
            if self.requested > self.completed:
                self.hand_over()
                continue
            self.check_window()
            time.sleep(0.05)
        return self.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m appliance.programs.registry PROGRAM_JSON", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        program = Program.load(path)
    except (OSError, ValueError, KeyError) as error:
        print(
            f"registry-handover: cannot read {path}: {error}; run appliance-ctl reconfigure.",
            file=sys.stderr,
        )
        return 2
    return Wrapper(path, program).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
