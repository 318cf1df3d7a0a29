"""CPU time of the appliance's processes, read from /proc, for the bench scripts.

CPU seconds per unit of work hardly move with other load on a shared machine, where
requests per second and MB/s do; the benches print both.
"""

from __future__ import annotations

import os
from pathlib import Path

from recipes.nginx import worker_pids


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU so far of a process and, unless told not to, of its live
    children (nginx's or gunicorn's workers; not supervisord's services)."""
    total = 0.0
    for each in (pid, *(worker_pids(pid) if children else ())):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total
