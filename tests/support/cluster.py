"""Several appliance nodes on one machine, each a host of its own (tests/support/netns.py):

    db     10.77.0.2    PostgreSQL (the auth data), Redis, the moto S3 server
    front  10.77.0.10   an nginx load-balancing the nodes (round robin, passive health
                        checks), where the clients run too
    a, b   10.77.0.11,  appliance nodes: own temporary roots, the same bucket, the same
           10.77.0.12   Redis, the same secrets (cluster export on a, join on b)

Every node is reached as a user reaches the cluster: https://10.77.0.10 (the token
realm is the front's URL), with one admin-provided certificate for that address served
by the front and by each node (README, Several hosts: the supported way behind a load
balancer). `Cluster.start()` builds it all and `stop()` tears it down, the namespaces
included; tests/appliance/test_cluster.py and bench/cluster use it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.appliance import BIN, ApplianceUnderTest
from tests.support.counting_client import Registry
from tests.support.netns import Host, Network
from tests.support.pull_loop import PullLoop
from tests.support.redis import RedisServer, start_redis

if TYPE_CHECKING:
    from tests.support.postgres import PostgresServer

FRONT_PORT = 443
S3_PORT = 5000
REDIS_PORT = 6379
PASSWORD = "cluster-root-password"


@dataclass
class Node(ApplianceUnderTest):
    """An appliance whose every appliance-ctl runs inside its host (so supervisord and
    every service it starts live in that namespace)."""

    host: Host | None = None
    front_certificate: Path | None = None

    def ctl(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
        assert self.host is not None
        with self.host.entered():
            return super().ctl(*args, **kwargs)

    @property
    def certificate(self) -> Path:
        assert self.front_certificate is not None
        return self.front_certificate

    @property
    def address(self) -> str:
        """Where this node's nginx answers (its own address, the TLS port)."""
        assert self.host is not None
        return f"{self.host.address}:{FRONT_PORT}"

    def processes(self) -> list[int]:
        """supervisord and every process under it."""
        pidfile = self.root / "var/opt/appliance/supervisor/supervisord.pid"
        try:
            top = int(pidfile.read_text())
        except (OSError, ValueError):
            return []
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
        found, todo = [], [top]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def kill_everything(self) -> list[int]:
        """kill -9 of supervisord and all its children, as a host that dies would."""
        pids = self.processes()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


@dataclass
class Front:
    """nginx on the front host: TLS with the cluster's certificate, round robin to the
    nodes' TLS ports; a node that refuses or drops a connection is skipped for
    fail_timeout and the request tried on the next (for GETs: proxy_next_upstream)."""

    host: Host
    directory: Path
    certificate: Path
    key: Path
    nodes: list[str]  # host:port
    process: subprocess.Popen | None = None
    password: str = PASSWORD

    @property
    def registry_address(self) -> str:
        return f"{self.host.address}:{FRONT_PORT}"

    def config(self) -> str:
        servers = "\n".join(f"    server {n} max_fails=1 fail_timeout=5s;" for n in self.nodes)
        d = self.directory
        return f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  client_max_body_size 0;
  upstream nodes {{
{servers}
    keepalive 32;
  }}
  server {{
    listen {self.registry_address} ssl;
    ssl_certificate {self.certificate};
    ssl_certificate_key {self.key};
    location / {{
      proxy_pass https://nodes;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-Proto https;
      proxy_ssl_verify off;
      proxy_ssl_session_reuse on;
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_connect_timeout 1s;
      proxy_read_timeout 120s;
      proxy_next_upstream error timeout http_502 http_503;
      proxy_next_upstream_tries 2;
    }}
  }}
}}
"""

    def start(self) -> None:
        (self.directory / "nginx.conf").write_text(self.config())
        self.process = subprocess.Popen(
            [*self.host.prefix, "nginx", "-c", str(self.directory / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.host, self.host.address, FRONT_PORT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)


def wait_port(host: Host, address: str, port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    with host.entered():
        while True:
            try:
                socket.create_connection((address, port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing answers on {address}:{port}") from None
                time.sleep(0.1)


POSTGRES_PORT = 5432


def start_postgres(db: Host, base: Path) -> tuple[PostgresServer, subprocess.Popen]:
    """PostgreSQL on the db host: tests/support/postgres.py's server (Debian's initdb as
    `nobody`, scram passwords) on the host's address, run through `ip netns exec`."""
    from tests.support.postgres import start_server

    return start_server(base, db.address, POSTGRES_PORT, db.prefix)


def make_certificate(directory: Path, address: str) -> tuple[Path, Path]:
    """One certificate for the cluster's address, as an admin would buy or make it."""
    cert, key = directory / "cluster.crt", directory / "cluster.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30", "-subj", f"/CN={address}",
            "-addext", f"subjectAltName=IP:{address}", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    cert.chmod(0o644)
    key.chmod(0o600)
    return cert, key


@dataclass
class Cluster:
    network: Network
    db: Host
    front_host: Host
    directory: Path
    redis: RedisServer | None = None
    s3: subprocess.Popen | None = None
    postgres: PostgresServer | None = None
    postgres_process: subprocess.Popen | None = None
    front: Front | None = None
    nodes: list[Node] = field(default_factory=list)
    node_config: dict = field(default_factory=dict)

    @classmethod
    def start(cls, count: int = 2, extra: dict | None = None) -> Cluster:
        """The db host's engines, `count` nodes (the first exports, the others join) and
        the front."""
        network = Network()
        directory = Path(tempfile.mkdtemp(prefix="appliance-cluster-"))
        directory.chmod(0o755)
        cluster = cls(network, network.add_host("db", 2), network.add_host("lb", 10), directory)
        try:
            cluster._start(count, extra or {})
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, count: int, extra: dict) -> None:
        db = self.db
        self.redis = start_redis(db.address, REDIS_PORT, "cluster-redis-password", db.prefix)
        self.s3 = subprocess.Popen(
            [*db.prefix, str(BIN / "moto_server"), "-H", db.address, "-p", str(S3_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(db, db.address, S3_PORT)
        self.postgres, self.postgres_process = start_postgres(db, self.directory / "postgres")
        self.postgres.sql('CREATE DATABASE "registry"')
        from tests.support.s3 import s3_client

        with db.entered():
            s3_client(f"http://{db.address}:{S3_PORT}").create_bucket(Bucket="registry")
        cert, key = make_certificate(self.directory, self.front_host.address)
        redis_password = self.directory / "redis-password"
        redis_password.write_text(self.redis.password + "\n")
        redis_password.chmod(0o600)
        self.node_config = {
            "registry_external_url": f"https://{self.front_host.address}:{FRONT_PORT}",
            "initial_root_password": PASSWORD,
            "nginx": {"listen_addresses": ["*"]},
            "registry_nginx": {"ssl_certificate": str(cert), "ssl_certificate_key": str(key)},
            "registry": {
                "storage": {
                    "s3": {
                        "accesskey": "testing",
                        "secretkey": "testing",
                        "bucket": "registry",
                        "region": "us-east-1",
                        "regionendpoint": f"http://{db.address}:{S3_PORT}",
                        "secure": False,
                        "v4auth": True,
                    },
                    "redirect": {"disable": True},
                }
            },
            "redis": {"url": self.redis.url, "password_file": str(redis_password)},
            "auth": {
                "database_url": self.postgres.url("registry"),
                "database_password_file": str(self.postgres.password_file),
            },
        }
        from tests.support.appliance import deep_merge

        self.node_config = deep_merge(self.node_config, extra)
        export = self.directory / "cluster-secrets.json"
        for number in range(count):
            host = self.network.add_host(chr(ord("a") + number), 11 + number)
            node = Node.create(self.node_config, prefix=f"appliance-node-{host.name[-1]}-")
            node.host, node.front_certificate = host, cert
            self.nodes.append(node)
            if number == 0:
                node.reconfigure()
                node.ctl("cluster", "export", str(export))
            else:
                node.ctl("cluster", "join", str(export))
            wait_port(host, host.address, FRONT_PORT)
        self.front = Front(
            self.front_host,
            self.directory / "front",
            cert,
            key,
            [node.address for node in self.nodes],
        )
        self.front.directory.mkdir()
        self.front.start()

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.destroy()
            except Exception:  # noqa: BLE001 - tear the rest down all the same
                pass
        if self.front:
            self.front.stop()
        if self.redis:
            self.redis.stop()
        if self.s3 and self.s3.poll() is None:
            self.s3.terminate()
            self.s3.wait(10)
        if self.postgres_process and self.postgres_process.poll() is None:
            self.postgres_process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.postgres_process.wait(20)
            except subprocess.TimeoutExpired:
                self.postgres_process.kill()
        self.network.destroy()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class TimedPulls:
    """Pulls through the front in a loop from the front host, each success and failure
    with its time (time.monotonic)."""

    cluster: Cluster
    images: list[tuple[str, str]]
    threads: int = 2
    done: list[tuple[float, bool, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> TimedPulls:
        for number in range(self.threads):
            worker = threading.Thread(target=self._loop, args=(number,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> TimedPulls:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)
        return self

    def _loop(self, number: int) -> None:
        self.cluster.front_host.enter_for_good()  # this worker thread only
        registry = Registry(self.cluster.front)
        conn = registry.client()
        turn = number
        while not self._stop.is_set():
            repository, tag = self.images[turn % len(self.images)]
            turn += 1
            try:
                PullLoop.pull(registry, conn, repository, tag)
                self.done.append((time.monotonic(), True, ""))
            except (OSError, http.client.HTTPException, AssertionError, ValueError) as exc:
                self.done.append((time.monotonic(), False, repr(exc)[:200]))
                conn.reset()
                time.sleep(0.05)

    def failures(self) -> list[tuple[float, bool, str]]:
        return [d for d in self.done if not d[1]]


def push_images(cluster: Cluster, prefix: str, count: int) -> list[tuple[str, str]]:
    """`count` small images pushed through the front (a token, two blobs, a manifest)."""
    images = []
    with cluster.front_host.entered():
        registry = Registry(cluster.front)
        conn = registry.client()
        for number in range(count):
            repository = f"root/{prefix}-{number}"
            token = registry.token(conn, repository)
            layer = hashlib.sha256(f"{prefix}{number}".encode()).digest() * 2048
            registry.push_image(conn, token, repository, "v1", layer)
            images.append((repository, "v1"))
        conn.close()
    return images
