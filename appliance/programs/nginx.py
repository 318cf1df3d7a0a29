"""The nginx program: `python -m appliance.programs.nginx PID_FILE NGINX_COMMAND...`.

A master killed outright (kill -9, the OOM killer) leaves its workers running: they
keep the listening sockets, so the master supervisord starts next cannot bind
("Address already in use") and nginx stays down while the orphans go on serving the
old configuration. So supervisord does not start nginx itself but this wrapper: it
retires the dead master's workers, then becomes nginx (exec: same pid, so supervisord's
HUP and QUIT reach the master). recipes/nginx.py writes the program file that runs it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from appliance import procfs


def orphaned_workers(pid_file: Path) -> list[int]:
    """nginx processes left in the process group of a master that is gone.

    supervisord makes each program a process group leader, so the group id is the dead
    master's pid, the one its pid file still holds. Linux reuses no pid that is still a
    group id, so what is found in that group is the orphans; while that pid is alive,
    nothing is touched.
    """
    try:
        master = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return []
    processes = {}  # pid -> (name, state, process group)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()  # state, ppid, pgrp, ...
        processes[int(stat.parent.name)] = (
            text[text.find("(") + 1 : text.rfind(")")],
            fields[0],
            int(fields[2]),
        )
    if master in processes and processes[master][1] not in "ZX":
        return []  # the master lives: those are its workers
    return [
        pid
        for pid, (name, _, group) in processes.items()
        if group == master and pid != master and name == "nginx"
    ]


def retire_orphaned_workers(pid_file: Path, timeout: float = 5.0) -> None:
    """QUIT the orphans (they finish their transfers), KILL what is left at `timeout`."""
    procfs.stop(orphaned_workers(pid_file), timeout, (signal.SIGQUIT, signal.SIGKILL))


def main(argv: list[str]) -> None:
    pid_path, nginx = Path(argv[0]), argv[1:]
    retire_orphaned_workers(pid_path)
    os.execv(nginx[0], nginx)


if __name__ == "__main__":
    main(sys.argv[1:])
