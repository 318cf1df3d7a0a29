"""The first thing supervisord runs for every program: tie it to its supervisor.

    python -I -S launcher.py SUPERVISOR_CONFIG SERVICE -- COMMAND...

A supervisord killed outright (kill -9, the OOM killer) used to leave nginx and the
token service running unsupervised on their ports, so the next supervisord's programs
crash-looped behind them. Here, in the child itself (after supervisord's setuid, which
would clear it), the kernel is asked to send SIGTERM when the parent dies
(PR_SET_PDEATHSIG, kept across exec); the parent is then checked to still be this root's
supervisord (it may have died before the request); and the root's marker goes into the
environment, so a leftover is recognised as this root's by the next start. Then the
program is exec'd: same pid, so supervisord's signals reach it.

Standard library only and run with -I -S: it costs a few milliseconds per start.
"""

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
ROOT_MARKER = "APPLIANCE_SUPERVISOR"  # appliance.procfs reads these two
SERVICE_MARKER = "APPLIANCE_SERVICE"


def parent_command(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def main(argv: list) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: launcher.py SUPERVISOR_CONFIG SERVICE -- COMMAND...")
    import ctypes  # here, not at the top: appliance.procfs imports the markers

    marker, service, command = argv[0], argv[1], argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        sys.exit(
            f"{service}: cannot ask for a signal on the death of supervisord: "
            f"{os.strerror(ctypes.get_errno())}"
        )
    parent = os.getppid()
    if os.fsencode(marker) not in parent_command(parent).split(b"\0"):
        sys.exit(
            f"{service}: not started by the supervisord of {marker} (parent pid "
            f"{parent}); it is not run"
        )
    os.environ[ROOT_MARKER] = marker
    os.environ[SERVICE_MARKER] = service
    try:
        os.execv(command[0], command)
    except OSError as error:
        sys.exit(f"{service}: cannot run {command[0]}: {error.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
