"""Hosts on one machine: network namespaces with their own addresses, for the tests of
several appliance nodes (tests/appliance/test_cluster.py).

`Network` makes a private switch (a namespace holding only a bridge) and, per host, a
namespace with a loopback and an `eth0` whose veth peer is plugged into the bridge:

    ap<id>-sw:  br0 ── p1 ── eth0 of ap<id>-db   10.77.0.2
                    ── p2 ── eth0 of ap<id>-a    10.77.0.11   ...

Nothing is attached to the machine's own namespace: no address, route or interface of
the host changes, and the hosts' traffic cannot leave the bridge. Each host has its own
127.0.0.1 too, so services of two hosts may use the same loopback port.

Programs run inside a host with `ip netns exec` (`Host.prefix`), or, for Python code of
the test itself (an HTTP client, a subprocess started by a helper), inside
`with host.entered():`, which moves the calling thread into the namespace with
setns(2) and back after (children started meanwhile stay there). `destroy()` ends every
process still in the namespaces and removes them; the veths and the bridge go with them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


@dataclass
class Host:
    name: str  # the namespace
    address: str

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command inside this host, its output captured; a failure raises."""
        return subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=timeout, check=True
        )

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread inside this host's namespace for the block."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)

    def enter_for_good(self) -> None:
        """The calling thread (a worker started for it) inside this host until it ends."""
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=10
        ).stdout
        return [int(p) for p in out.split()]

    def block(self) -> None:
        """Take the host off the network (its cable pulled): packets to it are dropped."""
        ip("-n", self.name, "link", "set", "eth0", "down")


@dataclass
class Network:
    subnet: str = "10.77.0"
    id: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.switch = f"ap{self.id}-sw"
        ip("netns", "add", self.switch)
        try:
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.destroy()
            raise

    def add_host(self, label: str, number: int) -> Host:
        """A namespace ap<id>-<label> with address <subnet>.<number>/24 on the switch."""
        host = Host(f"ap{self.id}-{label}", f"{self.subnet}.{number}")
        ip("netns", "add", host.name)
        self.hosts.append(host)
        port = f"p{number}"
        ip(
            "link", "add", "name", "eth0", "netns", host.name, "type", "veth",
            "peer", "name", port, "netns", self.switch,
        )  # fmt: skip
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.name, "link", "set", "eth0", "up")
        ip("-n", host.name, "link", "set", "lo", "up")
        return host

    def destroy(self) -> None:
        """Every process left in the hosts is ended (they are the test's), then the
        namespaces removed."""
        for host in self.hosts:
            for pid in host.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in [h.name for h in self.hosts] + [self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
