"""The audit trail: one JSON line per token request, granted or denied.

Every worker appends to the same file with O_APPEND and a single write() per record,
so lines from different processes never interleave.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def record(self, **fields: object) -> None:
        now = time.time()
        millis = int(now % 1 * 1000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z"
        # pid: which worker answered, so an operator can follow one process's decisions.
        record = {"time": stamp, **fields, "pid": os.getpid()}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        os.write(self._descriptor(), line.encode())

    def _descriptor(self) -> int:
        if self._pid == os.getpid() and self._fd is not None:
            return self._fd
        with self._lock:  # one descriptor per process, opened after the fork
            if self._pid != os.getpid() or self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._pid = os.getpid()
            return self._fd
