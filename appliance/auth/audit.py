"""The audit trail: one JSON line per token request, granted or denied.

Three promises, each because a client controls what reaches this file:
- A record is bounded: every text is cut at a fixed length and every list at a fixed
  number of items, with a marker saying how much was left out, so an anonymous request
  cannot write kilobytes.
- The file is bounded: the service rotates it itself (audit.log -> audit.log.1 -> ... ->
  audit.log.N) before a line would take it past max_bytes. The gunicorn workers share
  the file, so the size check, the renames and the write happen under one flock on the
  log's directory (which never rotates): no line is lost and none interleaves. A worker
  whose descriptor no longer names the file at the path (another worker rotated, an
  admin or logrotate moved it) reopens the path before writing.
- Serving never waits on logging: when the line cannot be written (disk full, the file
  unopenable) the request is answered anyway and the line is counted as lost; the count
  goes to the service log (stderr) at most once a minute while writes fail, and once
  more when writing works again.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

MAX_TEXT = 256
"""Characters kept of one text field (a username, a client address, a reason: 4x)."""
MAX_ITEMS = 10
"""Items kept of one list (requested and granted scopes)."""
REPORT_INTERVAL = 60.0
"""Seconds between two reports of lost lines on the service log while writes fail."""


def bounded(name: str, value: object) -> object:
    """The value as the record may hold it: long texts and lists cut, with a marker."""
    if isinstance(value, str):
        limit = MAX_TEXT * 4 if name == "reason" else MAX_TEXT
        if len(value) > limit:
            return f"{value[:limit]}...[{len(value) - limit} more characters]"
        return value
    if isinstance(value, list | tuple):
        items = [bounded("", item) for item in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"...[{len(value) - MAX_ITEMS} more]")
        return items
    return value


class AuditLog:
    def __init__(self, path: Path, max_bytes: int = 0, backups: int = 0) -> None:
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self.lost = 0
        """Lines this process could not write since the last report."""
        self._lost_reason = ""
        self._reported_at = 0.0
        self._fd: int | None = None
        self._directory_fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def record(self, **fields: object) -> None:
        now = time.time()
        millis = int(now % 1 * 1000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z"
        # pid: which worker answered, so an operator can follow one process's decisions.
        record = {"time": stamp, **fields, "pid": os.getpid()}
        record = {name: bounded(name, value) for name, value in record.items()}
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:  # threads of one worker; other workers wait on the flock
            try:
                self._write(line)
            except OSError as error:
                self._lose(error)
            else:
                if self.lost:
                    self._report(f"writing {self.path} works again")
                    self.lost = 0

    # -- writing ------------------------------------------------------------------------
    def _write(self, line: bytes) -> None:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fd = self._directory_fd = None
            self._pid = os.getpid()
        if self._directory_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._directory_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._directory_fd, fcntl.LOCK_EX)
        try:
            if self._fd is None or not self._names_the_file():
                self._reopen()
            size = os.fstat(self._fd).st_size
            if self.max_bytes and size and size + len(line) > self.max_bytes:
                self._rotate()
            written = 0
            while written < len(line):  # a short write on a nearly full disk: finish it
                written += os.write(self._fd, line[written:])
        finally:
            fcntl.flock(self._directory_fd, fcntl.LOCK_UN)

    def _names_the_file(self) -> bool:
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (at_path.st_dev, at_path.st_ino) == (mine.st_dev, mine.st_ino)

    def _reopen(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        # O_NOFOLLOW: the log directory may belong to the service account; never write
        # through a link someone put in place of the file.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o640)

    def _rotate(self) -> None:
        """audit.log.N-1 -> audit.log.N, ..., audit.log -> audit.log.1; the oldest goes."""
        for number in range(self.backups - 1, 0, -1):
            older = Path(f"{self.path}.{number}")
            if older.exists():
                os.replace(older, f"{self.path}.{number + 1}")
        if self.backups:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._reopen()

    # -- lost lines -----------------------------------------------------------------------
    def _lose(self, error: OSError) -> None:
        self.lost += 1
        self._lost_reason = error.strerror or str(error)
        if self._fd is not None:  # a fresh descriptor next time: the file may be back
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        now = time.monotonic()
        if self.lost == 1 or now - self._reported_at >= REPORT_INTERVAL:
            self._report(f"cannot write {self.path} ({self._lost_reason})")

    def _report(self, what: str) -> None:
        self._reported_at = time.monotonic()
        message = (
            f"appliance-auth: audit log: {what}; {self.lost} audit line(s) lost"
            f" in worker {os.getpid()} so far, token requests are answered regardless.\n"
        )
        try:
            sys.stderr.write(message)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # the service log is gone too: the count stays for the next report
