"""What every run that changes the host stands on: the lock that keeps two runs apart
and the log that keeps what a run printed. The run itself is appliance.pipeline.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from appliance import secrets as secrets_module
from appliance.engine import Redactor
from appliance.errors import LockError, ServiceError
from appliance.settings import Settings, is_sensitive, sensitive_values

LOCK_WAIT_SECONDS = 300
RUN_LOGS_KEPT = 30


@contextmanager
def reconfigure_lock(
    path: Path, out: Callable[[str], None], wait: float = LOCK_WAIT_SECONDS
) -> Iterator[None]:
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
                        raise LockError(
                            f"another reconfigure (pid {holder}) has held {path} "
                            f"for over {int(wait)} s; wait for it or stop it."
                        ) from None
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
    """Tee of everything a run prints, kept under the log directory, secrets masked
    (`redact`, set once the run knows its secrets) whoever printed the line."""

    def __init__(
        self,
        stream: TextIO | None,
        directory: Path | None,
        redact: Callable[[str], str] | None = None,
    ):
        self.stream = stream
        self.lines: list[str] = []
        self.directory = directory
        self.redact = redact or Redactor()

    def __call__(self, line: str) -> None:
        line = self.redact(line)
        self.lines.append(line)
        if self.stream is None:
            return
        try:
            print(line, file=self.stream, flush=True)
        except OSError:  # the terminal is gone (a dropped SSH session): the log goes on
            self.stream = None

    def note(self, line: str) -> None:
        """Keep `line` in the log without printing it (the CLI prints the error itself)."""
        self.lines.append(line)

    def save(self) -> Path | None:
        """Keep the run's lines; a log that cannot be kept (a full disk) is said in one
        sentence and is no failure of the run: serving never depends on logging."""
        if self.directory is None:
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.directory / f"{stamp}.log"
        # Written whole under another name (mode 0600 from the start), then renamed: a
        # reader of the run logs (an admin, the renewer's tests) never sees half of one.
        partial = self.directory / f".{stamp}.log.partial"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write("\n".join(self.lines) + "\n")
            os.replace(partial, path)
            for old in sorted(self.directory.glob("*.log"))[:-RUN_LOGS_KEPT]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            if self.stream is not None:
                print(
                    f"The log of this run could not be kept in {self.directory}: "
                    f"{exc.strerror or exc}.",
                    file=self.stream,
                    flush=True,
                )
            return None
        return path


def redactor(settings: Settings, secrets: secrets_module.Secrets) -> Redactor:
    """What a run masks in its output and its log: every value show-config masks, every
    generated secret, and whatever a diffed file holds under a sensitive key."""
    return Redactor([*sensitive_values(settings), *secrets.private_values()], is_sensitive)


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
                    raise ServiceError(
                        f"{service} runs but does not accept connections on "
                        f"{address} ({exc.strerror or exc}); see "
                        f"appliance-ctl tail {service}."
                    ) from None
                time.sleep(0.05)
