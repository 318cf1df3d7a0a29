"""What /proc says about processes: who listens on an address, a process's tree, and
the leftovers of an appliance root whose supervisord died.

Read straight from /proc (no psutil, no ss): cheap enough for every run, including a
no-op reconfigure, and it answers the questions a port number alone cannot: *which*
process holds it, and is that one ours.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.launcher import ROOT_MARKER

PROC = Path("/proc")
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
UNIX_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


@dataclass(frozen=True)
class Listener:
    """A process holding a listening socket."""

    pid: int
    name: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.name})"


def split_address(address: str) -> tuple[str, int]:
    """host:port (host may be [v6], empty, *, or localhost) -> (ip text or '', port)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "*", "0.0.0.0", "::"):
        host = ""
    elif host.lower() == "localhost":
        host = "127.0.0.1"
    return host, int(port)


def _decode_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return "" if ip.is_unspecified else str(ip)


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN_STATE = 10


def tcp_listeners(family: int) -> list[tuple[str, int, int]]:
    """(ip or '' for any, port, inode) of every listening TCP socket of `family`, asked
    of the kernel's sock_diag netlink interface filtered to the LISTEN state: reading
    /proc/net/tcp walks every connection of a busy host (milliseconds a read)."""
    request = struct.pack(
        "=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN_STATE
    ) + bytes(48)
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, 0x301, 1, 0)
    found = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(2)
        diag.send(header + request)
        while True:
            data = diag.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR or length < 16:
                    raise OSError("sock_diag refused the request")
                body = offset + 16
                port = struct.unpack_from("!H", data, body + 4)[0]
                raw = data[body + 8 : body + 8 + (4 if family == socket.AF_INET else 16)]
                inode = struct.unpack_from("=I", data, body + 68)[0]
                found.append((_normal_ip(socket.inet_ntop(family, raw)), port, inode))
                offset += (length + 3) & ~3


def _normal_ip(text: str) -> str:
    """'' for the any-address; an IPv4-mapped IPv6 address as IPv4."""
    if text in ("0.0.0.0", "::"):
        return ""
    return text[7:] if text.startswith("::ffff:") and "." in text else text


class ListenTable:
    """The host's listening sockets, read once (/proc/net/tcp grows with every connection
    on a busy host: one read per run, not one per address)."""

    def __init__(self) -> None:
        self.tcp: list[tuple[str, int, int]] = []  # (ip or '' for any, port, inode)
        self.unix: dict[str, set[int]] = {}
        self.held: dict[int, set[int]] = {}  # pid -> its socket inodes, read once
        try:
            self.tcp = tcp_listeners(socket.AF_INET) + tcp_listeners(socket.AF_INET6)
        except OSError:  # no sock_diag (an old or locked-down kernel): the text tables
            self._read_tcp_tables()
        try:
            lines = (PROC / "net/unix").read_text().splitlines()[1:]
        except OSError:
            lines = []
        for line in lines:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & UNIX_LISTENING:
                self.unix.setdefault(fields[7], set()).add(int(fields[6]))

    def _read_tcp_tables(self) -> None:
        for table in ("tcp", "tcp6"):
            try:
                lines = (PROC / "net" / table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields[3] == LISTEN:
                    local_ip, local_port = fields[1].split(":")
                    self.tcp.append((_decode_ip(local_ip), int(local_port, 16), int(fields[9])))

    def sockets_of(self, pid: int) -> set[int]:
        if pid not in self.held:
            self.held[pid] = _socket_inodes(pid)
        return self.held[pid]

    def inodes(self, address: str) -> set[int]:
        """Inodes of the listening sockets a bind to `address` would collide with."""
        if address.startswith("/"):
            return set(self.unix.get(address, ()))
        host, port = split_address(address)
        wanted = ipaddress.ip_address(host) if host else None
        return {
            inode
            for bound, bound_port, inode in self.tcp
            if bound_port == port
            and (not bound or wanted is None or ipaddress.ip_address(bound) == wanted)
        }


def children(pid: int) -> list[int]:
    found = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def tree(pid: int) -> list[int]:
    """`pid` and every descendant of it."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children(current)
    return out


def process_name(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "gone"


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(PROC / str(pid) / "fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(PROC / str(pid) / "fd" / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


def listener(
    address: str, likely: Iterable[int] = (), table: ListenTable | None = None
) -> Listener | None:
    """The process holding a listening socket on `address`, None if nothing listens.

    The `likely` pids (our own services) are searched first; every process only when
    none of them holds it. A socket whose holder cannot be read (another user's process
    while we are not root) is reported as pid 0.
    """
    table = table or ListenTable()
    inodes = table.inodes(address)
    if not inodes:
        return None
    likely = list(likely)
    for pid in likely:
        if table.sockets_of(pid) & inodes:
            return Listener(pid, process_name(pid))
    for pid in (p for p in all_pids() if p not in set(likely)):
        if _socket_inodes(pid) & inodes:
            return Listener(pid, process_name(pid))
    return Listener(0, "unknown")


def environment(pid: int) -> dict[str, str]:
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def process_group(pid: int) -> int | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(text[text.rfind(")") + 2 :].split()[2])


def _cmdline(pid: int) -> str:
    try:
        return (
            (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def leftovers(
    supervisor_config: Path, pid_files: Iterable[Path] = (), spare: Iterable[int] = ()
) -> list[int]:
    """Processes of this appliance root that no live supervisord of it runs.

    A program of this root carries ROOT_MARKER in its environment (the launcher puts
    it there); one that overwrote its environment with its process title (nginx) is
    found by the pid file it keeps, checked against its command line so a reused pid
    is never taken for it. Every member of such a process's group goes too (nginx's
    workers, gunicorn's). `spare`: pids that are not leftovers (a live supervisord's
    tree, ourselves).
    """
    spare = set(spare) | {os.getpid(), os.getppid()}
    marker = str(supervisor_config)
    leaders = set()
    pids = all_pids()
    for pid in pids:
        if pid not in spare and environment(pid).get(ROOT_MARKER) == marker:
            leaders.add(pid)
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid not in spare and str(pid_file.parent) in _cmdline(pid):
            leaders.add(pid)
    groups = {process_group(pid) for pid in leaders} - {None, 0, 1}
    found = set(leaders)
    for pid in pids:
        if pid not in spare and process_group(pid) in groups:
            found.add(pid)
    return sorted(found - spare)


def stop(
    pids: list[int],
    timeout: float = 10,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL),
) -> None:
    """TERM (or the first of `signals`), then KILL whatever is left after `timeout`
    seconds."""
    deadline = time.monotonic() + timeout
    for sig in signals:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if pids:
                time.sleep(0.05)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)  # ours: reap it
        except ChildProcessError:
            pass
        return False
    return True
