"""Registry settings of the reference guide, observed on a running appliance.

test_recipe_registry.py and test_recipe_nginx.py show what each setting renders; here
real processes show what it does:
- debug_addr: /debug/health, /debug/vars and Prometheus /metrics answer;
- notifications: the push event reaches a loopback listener with the configured header,
  and an endpoint that is down gets it again (threshold, then backoff);
- env: REGISTRY_HTTP_RELATIVEURLS turns upload Locations relative, and back;
- compatibility_schema1_enabled: a schema1 push is refused, then accepted;
- storage_delete_enabled: skopeo delete is refused (405), then works;
- storage_path and the s3 driver (a real moto server): blobs land where they are told,
  redirect.disable decides between streaming and a redirect to the bucket;
- http_addr: the registry restarts on the new address, nginx reloads (same master);
- listen_network: unix: no TCP port, a socket only nginx's account may connect to, one
  that survives a kill -9 of the registry;
- internal_key, key_path, issuer: tokens signed with that key are the ones accepted;
- log_level, logging.max_bytes/backups: the registry logs at that level; every
  service logs under the log directory, capped and rotated;
- enable: false stops registry and token service and removes the vhost, images stay;
- the registry's own domain vs the main one: the certificate is named after and covers
  the registry host; certificate files replaced by the admin reload nginx only;
  registry_nginx.listen_port and ssl_protocols apply by reload.

One appliance serves the whole module (starting one is the slow part); each test that
changes a setting puts it back (`reconfigured`), so the tests stay independent.
"""

from __future__ import annotations

import copy
import grp
import hashlib
import http.client
import itertools
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from appliance import pki
from recipes.nginx import worker_pids
from tests.support.appliance import ApplianceUnderTest, free_port
from tests.support.oci import CONFIG_TYPE, OciImage, build_image
from tests.support.pebble import NamedSkopeo
from tests.support.s3 import s3_client
from tests.support.skopeo import Skopeo, SkopeoError

BIN = Path(sys.prefix) / "bin"
EVENTS_TYPE = "application/vnd.docker.distribution.events.v1+json"


# ---------------------------------------------------------------- helpers


class NotificationListener:
    """A webhook endpoint on loopback recording every envelope the registry posts."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict, list[dict]]] = []  # (headers, events) per POST taken
        self.refused: list[tuple[float, list[str]]] = []  # (when, event ids) per POST refused
        self.refuse_next = 0  # answer this many POSTs with 503, as an endpoint that is down
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                events = json.loads(body)["events"]
                if listener.refuse_next > 0:
                    listener.refuse_next -= 1
                    listener.refused.append((time.monotonic(), [e["id"] for e in events]))
                    self.send_response(503)
                else:
                    listener.posts.append((dict(self.headers), events))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, action: str, repository: str, timeout: float = 15) -> tuple[dict, dict]:
        """(headers of the POST, the event) of the manifest `action` on `repository`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for headers, events in list(self.posts):
                for event in events:
                    target = event.get("target", {})
                    if (
                        event.get("action") == action
                        and target.get("repository") == repository
                        and target.get("mediaType", "").endswith("manifest.v1+json")
                    ):
                        return headers, event
            time.sleep(0.1)
        raise AssertionError(f"no {action} event for {repository}; got {self.posts}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(url: str, context: ssl.SSLContext | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    return urllib.request.urlopen(request, context=context, timeout=10)


def is_listening(address: str) -> bool:
    if address.startswith("/"):  # a unix socket
        with socket.socket(socket.AF_UNIX) as sock:
            return sock.connect_ex(address) == 0
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


def tls_context(appliance: ApplianceUnderTest) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(appliance.certificate))


def registry_port(appliance: ApplianceUnderTest) -> int:
    return int(appliance.registry_address.rsplit(":", 1)[1])


def served_certificate(port: int, server_name: str, cafile: Path | None = None) -> bytes:
    """The DER leaf nginx presents on 127.0.0.1:port for `server_name` (SNI).

    With `cafile` the handshake also verifies it, host name included, as a client would.
    """
    if cafile:
        context = ssl.create_default_context(cafile=str(cafile))
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.getpeercert(binary_form=True)


def https_connection(port: int, server_name: str, cafile: Path) -> http.client.HTTPSConnection:
    """HTTPS to 127.0.0.1:port as `server_name` (SNI, verification, Host header), for
    names no resolver of this host knows."""
    context = ssl.create_default_context(cafile=str(cafile))
    connection = http.client.HTTPSConnection(server_name, port, context=context, timeout=5)
    connection.sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=server_name
    )
    return connection


def leaf_der(path: Path) -> bytes:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].public_bytes(Encoding.DER)


def blob_path(storage: Path, digest: str) -> Path:
    """Where the filesystem driver keeps a blob under its root directory."""
    hex_digest = digest.split(":", 1)[1]
    return storage / f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"


def with_history(image: OciImage) -> OciImage:
    """The image with one history entry per layer in its config.

    Converting to schema1 (skopeo --format v2s1) needs it: schema1 carries one
    v1Compatibility entry per layer, built from the history.
    """
    blobs = image.layout / "blobs/sha256"
    index = json.loads((image.layout / "index.json").read_text())
    config = json.loads((blobs / image.config_digest.split(":")[1]).read_bytes())
    config["history"] = [{"created": "2026-01-01T00:00:00Z", "created_by": "test layer"}]
    config_bytes = json.dumps(config).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    (blobs / config_digest.split(":")[1]).write_bytes(config_bytes)
    manifest = json.loads((blobs / image.manifest_digest.split(":")[1]).read_bytes())
    manifest["config"] = {
        "mediaType": CONFIG_TYPE,
        "digest": config_digest,
        "size": len(config_bytes),
    }
    manifest_bytes = json.dumps(manifest).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    (blobs / manifest_digest.split(":")[1]).write_bytes(manifest_bytes)
    for entry in index["manifests"]:
        if entry["digest"] == image.manifest_digest:
            entry.update(digest=manifest_digest, size=len(manifest_bytes))
    (image.layout / "index.json").write_text(json.dumps(index))
    return OciImage(
        layout=image.layout,
        tag=image.tag,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=image.layer_digests,
        size=image.size,
    )


def push_schema1(client: Skopeo, image: OciImage, repository: str) -> None:
    """Push `image` converted to a signed schema1 manifest, as Docker 1.9 and older did."""
    client.run(
        "copy",
        "--quiet",
        "--format",
        "v2s1",
        f"--dest-cert-dir={client.cert_dir}",
        f"--dest-creds={client.username}:{client.password}",
        image.reference,
        client.url(repository, image.tag),
    )


def nginx_workers(appliance: ApplianceUnderTest) -> set[int]:
    """Pids of the nginx master's children (its workers)."""
    master = appliance.pids().get("nginx")
    return set(worker_pids(master)) if master else set()


def converge(appliance: ApplianceUnderTest) -> subprocess.CompletedProcess:
    """Reconfigure, then wait until nginx's workers from before a reload are gone.

    reconfigure itself returns once the old workers stop taking connections (a push
    made at once after an http_addr change must not meet an old worker's 502); they may
    still be finishing transfers. The tests wait until they have exited, so that one
    test's reload is over before the next test starts.
    """
    before = nginx_workers(appliance)
    result = appliance.reconfigure()
    if "+ service nginx (reloaded)" in result.stdout:
        deadline = time.monotonic() + 10
        while before & nginx_workers(appliance):
            assert time.monotonic() < deadline, "nginx's old workers are still there"
            time.sleep(0.02)
    return result


@contextmanager
def reconfigured(
    appliance: ApplianceUnderTest, changes: dict
) -> Iterator[subprocess.CompletedProcess]:
    """Reconfigure with `changes` for the body, then put the module's appliance back."""
    saved = copy.deepcopy(appliance.config)
    appliance.write_config(changes)
    try:
        yield converge(appliance)
    finally:
        appliance.config = saved
        appliance.write_config()
        converge(appliance)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def listener():
    listener = NotificationListener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def appliance(listener):
    appliance = ApplianceUnderTest.create(
        {
            "registry": {
                "debug_addr": f"127.0.0.1:{free_port()}",
                "env": {"REGISTRY_HTTP_RELATIVEURLS": True},
                "notifications": [
                    {
                        "name": "test-listener",
                        "url": listener.url,
                        "timeout": "2s",
                        "threshold": 3,
                        "backoff": "1s",
                        "headers": {"X-Appliance-Test": ["hello"]},
                    }
                ],
            }
        },
        prefix="appliance-settings-",
    )
    try:
        converge(appliance)
        yield appliance
    finally:
        appliance.destroy()


@pytest.fixture
def client_home(tmp_path: Path) -> Path:
    return tmp_path / "client"


@pytest.fixture
def client(appliance: ApplianceUnderTest, client_home: Path) -> Skopeo:
    return appliance.skopeo(client_home)


# ---------------------------------------------------------------- debug server, metrics


def test_debug_server_answers_health_vars_and_metrics(appliance):
    debug = f"http://{appliance.config['registry']['debug_addr']}"
    with get(f"{debug}/debug/health") as reply:
        assert reply.status == 200
    with get(f"{debug}/debug/vars") as reply:
        assert "docker-registry" in " ".join(json.load(reply)["cmdline"])
    with get(f"{debug}/metrics") as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        assert "# TYPE go_goroutines gauge" in reply.read().decode()


def test_metrics_count_requests_to_the_registry(appliance, client, tmp_path):
    debug = f"http://{appliance.config['registry']['debug_addr']}"
    image = build_image(tmp_path / "image", tag="metrics")
    client.push(image, "root/metrics", "metrics")
    with get(f"{debug}/metrics") as reply:
        metrics = reply.read().decode()
    assert 'registry_http_requests_total{code="201",handler="manifest",method="put"}' in metrics


# ---------------------------------------------------------------- notifications


def test_push_event_reaches_the_notification_listener(appliance, listener, client, tmp_path):
    image = build_image(tmp_path / "image", tag="v1")
    client.push(image, "root/notified", "v1")
    headers, event = listener.wait_for("push", "root/notified")
    assert headers["Content-Type"] == EVENTS_TYPE
    assert headers["X-Appliance-Test"] == "hello"
    assert event["target"]["digest"] == image.manifest_digest
    assert event["target"]["tag"] == "v1"
    assert event["request"]["host"] == appliance.registry_address  # nginx kept the port


def test_an_endpoint_that_is_down_gets_the_event_again_after_threshold_and_backoff(
    appliance, listener, client, tmp_path
):
    """threshold 3, backoff 1s: three attempts in a row, then one per second until the
    endpoint answers; nothing is lost meanwhile."""
    listener.refuse_next = 5
    image = build_image(tmp_path / "image", tag="retried")
    client.push(image, "root/retried", "retried")
    listener.wait_for("push", "root/retried", timeout=20)
    times = [when for when, _ in listener.refused]
    assert len(times) == 5
    assert len({tuple(ids) for _, ids in listener.refused}) == 1  # the same event each time
    assert times[2] - times[0] < 0.9  # up to the threshold: no waiting
    assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(times[2:]))
    delivered = [e["id"] for _, events in listener.posts for e in events]
    assert listener.refused[0][1][0] in delivered


def events_of(listener: NotificationListener, action: str, repository: str) -> list[dict]:
    return [
        event
        for _, events in list(listener.posts)
        for event in events
        if event.get("action") == action and event.get("target", {}).get("repository") == repository
    ]


def test_ignored_actions_are_not_sent(appliance, listener, client, tmp_path):
    """An endpoint's `ignore: {actions: [pull]}` reaches the registry: pulls go unreported
    while pushes still are (events reach one endpoint in order, so once a later push is
    in, an earlier pull event would be too)."""
    image = build_image(tmp_path / "image", tag="v1")
    client.push(image, "root/quiet", "v1")
    endpoint = {**appliance.config["registry"]["notifications"][0], "ignore": {"actions": ["pull"]}}
    with reconfigured(appliance, {"registry": {"notifications": [endpoint]}}):
        client.pull("root/quiet", "v1", tmp_path / "pulled")
        client.push(build_image(tmp_path / "marker", tag="after"), "root/quiet-marker", "after")
        listener.wait_for("push", "root/quiet-marker")
        assert events_of(listener, "pull", "root/quiet") == []
    client.pull("root/quiet", "v1", tmp_path / "pulled-again")
    listener.wait_for("pull", "root/quiet")


# ---------------------------------------------------------------- registry.env


def start_upload(appliance: ApplianceUnderTest, repository: str) -> str:
    """Location of a new blob upload, asked through nginx with a token from /jwt/auth."""
    bearer = appliance.token(f"repository:{repository}:push,pull")
    request = urllib.request.Request(
        f"https://{appliance.registry_address}/v2/{repository}/blobs/uploads/",
        method="POST",
        headers={"Authorization": f"Bearer {bearer}", "Content-Length": "0"},
    )
    with urllib.request.urlopen(request, context=tls_context(appliance), timeout=10) as reply:
        assert reply.status == 202
        return reply.headers["Location"]


def test_registry_env_reaches_the_registry(appliance):
    """REGISTRY_HTTP_RELATIVEURLS: the registry's upload Locations follow it both ways."""
    assert start_upload(appliance, "root/relative").startswith("/v2/root/relative/blobs/uploads/")
    with reconfigured(appliance, {"registry": {"env": {"REGISTRY_HTTP_RELATIVEURLS": False}}}):
        assert start_upload(appliance, "root/relative").startswith(
            f"https://{appliance.registry_address}/v2/root/relative/blobs/uploads/"
        )


# ---------------------------------------------------------------- schema1, delete


def test_schema1_manifests_are_accepted_only_when_enabled(appliance, client, tmp_path):
    image = with_history(build_image(tmp_path / "image", tag="old"))
    with pytest.raises(SkopeoError):
        push_schema1(client, image, "root/schema1")
    config = appliance.root / "var/opt/appliance/registry/config.yml"
    registry = appliance.registry_process()
    with reconfigured(appliance, {"registry": {"compatibility_schema1_enabled": True}}) as run:
        assert "compatibility:\n  schema1:\n    enabled: true\n" in config.read_text()
        assert "registry (reloaded)" in run.stdout  # handed over to a new process
        assert appliance.registry_process() != registry
        push_schema1(client, image, "root/schema1")
        manifest = client.inspect("root/schema1", "old")
        assert manifest["schemaVersion"] == 1
        assert [layer["blobSum"] for layer in manifest["fsLayers"]] == list(image.layer_digests)
    assert "enabled: false" in config.read_text().split("schema1:")[1]


def test_delete_is_refused_unless_enabled(appliance, client, tmp_path):
    image = build_image(tmp_path / "image", tag="doomed")
    client.push(image, "root/doomed", "doomed")
    with reconfigured(appliance, {"registry": {"storage_delete_enabled": False}}):
        with pytest.raises(SkopeoError) as refused:
            client.delete("root/doomed", "doomed")
        assert "405 Method Not Allowed" in refused.value.stderr
        assert "UNSUPPORTED" in refused.value.stderr
        assert client.digest("root/doomed", "doomed") == image.manifest_digest
    client.delete("root/doomed", "doomed")  # the default: enabled
    with pytest.raises(SkopeoError, match="manifest unknown"):
        client.digest("root/doomed", "doomed")


# ---------------------------------------------------------------- storage


def test_moved_storage_path_receives_the_blobs(appliance, client, tmp_path):
    default = appliance.root / "var/opt/appliance/registry/data"
    moved = appliance.root / "srv/registry-images"
    image = build_image(tmp_path / "image", tag="moved")
    with reconfigured(appliance, {"registry": {"storage_path": str(moved)}}):
        client.push(image, "root/moved-storage", "moved")
        for digest in (*image.layer_digests, image.config_digest, image.manifest_digest):
            assert blob_path(moved, digest).is_file()
            assert not blob_path(default, digest).exists()
        pulled = client.pull("root/moved-storage", "moved", tmp_path / "pulled")
        assert pulled.manifest_digest == image.manifest_digest
    # Back on the default directory, the image pushed to the other one is not there.
    with pytest.raises(SkopeoError, match="manifest unknown|name unknown"):
        client.digest("root/moved-storage", "moved")


def test_s3_storage_puts_the_blobs_in_the_bucket_and_redirects_as_told(
    appliance, s3_server, client, tmp_path
):
    s3_client(s3_server).create_bucket(Bucket="registry")
    secret = "moto-accepts-any-secret-key"
    storage = {
        "s3": {
            "accesskey": "testing",
            "secretkey": secret,
            "bucket": "registry",
            "region": "us-east-1",
            "regionendpoint": s3_server,
            "secure": False,
            "v4auth": True,
            "chunksize": 5 * 1024 * 1024,
            "rootdirectory": "/images",
        },
        # The rest of the guide's example; redirect keeps layers on the registry's path.
        "cache": {"blobdescriptor": "inmemory"},
        "delete": {"enabled": True},
        "redirect": {"disable": True},
    }
    image = build_image(tmp_path / "image", tag="v1", random_bytes=6 * 1024 * 1024)
    with reconfigured(appliance, {"registry": {"storage": storage}}) as run:
        assert "secretkey: ********" in run.stdout and secret not in run.stdout
        client.push(image, "root/on-s3", "v1")
        keys = {
            o["Key"]
            for o in s3_client(s3_server).list_objects_v2(Bucket="registry", Prefix="images/")[
                "Contents"
            ]
        }
        for digest in (*image.layer_digests, image.config_digest, image.manifest_digest):
            hex_digest = digest.split(":")[1]
            assert (
                f"images/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data" in keys
            )
            assert not blob_path(
                appliance.root / "var/opt/appliance/registry/data", digest
            ).exists()
        pulled = client.pull("root/on-s3", "v1", tmp_path / "pulled")
        assert (pulled.manifest_digest, pulled.config_digest, pulled.layer_digests) == (
            image.manifest_digest,
            image.config_digest,
            image.layer_digests,
        )
        # redirect.disable: the registry streams the layer itself ...
        layer = image.layer_digests[0]
        status, location, body = fetch_blob(appliance, "root/on-s3", layer)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer
        # ... and without it, sends the client to the bucket (which must then be
        # reachable from every client, as the guide warns).
        appliance.write_config({"registry": {"storage": {"redirect": {"disable": False}}}})
        converge(appliance)
        status, location, _ = fetch_blob(appliance, "root/on-s3", layer)
        assert status == 307 and location.startswith(f"{s3_server}/registry/images/docker/")


def fetch_blob(
    appliance: ApplianceUnderTest, repository: str, digest: str
) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of a blob GET through nginx; redirects are not followed."""
    bearer = appliance.token(f"repository:{repository}:pull")
    connection = http.client.HTTPSConnection(
        appliance.host, registry_port(appliance), context=tls_context(appliance), timeout=30
    )
    try:
        connection.request(
            "GET", f"/v2/{repository}/blobs/{digest}", headers={"Authorization": f"Bearer {bearer}"}
        )
        reply = connection.getresponse()
        return reply.status, reply.getheader("Location"), reply.read()
    finally:
        connection.close()


# ---------------------------------------------------------------- internal port


def test_new_internal_port_hands_the_registry_over_and_reloads_nginx(appliance, client, tmp_path):
    before = appliance.wait_until_running()
    serving = appliance.registry_process()
    old_addr = appliance.config["registry"]["http_addr"]
    new_addr = f"127.0.0.1:{free_port()}"
    nginx_config = appliance.root / "var/opt/appliance/nginx/conf/nginx.conf"
    with reconfigured(appliance, {"registry": {"http_addr": new_addr}}) as run:
        assert "registry (reloaded)" in run.stdout, run.stdout  # handed over
        assert "+ service nginx (reloaded)" in run.stdout
        after = appliance.pids()
        assert appliance.registry_process() != serving
        assert after["nginx"] == before["nginx"]  # reloaded in place: connections survive
        assert f"server {new_addr} max_fails=0;" in nginx_config.read_text()
        assert is_listening(new_addr) and not is_listening(old_addr)
        image = build_image(tmp_path / "image", tag="moved")
        client.push(image, "root/moved", "moved")
        assert client.list_tags("root/moved") == ["moved"]


def test_registry_on_a_unix_socket_has_no_tcp_port_and_only_nginx_may_connect(
    appliance, client, tmp_path
):
    before = appliance.wait_until_running()
    http_addr = appliance.config["registry"]["http_addr"]
    sock = appliance.root / "var/opt/appliance/registry-socket/registry.sock"
    nginx_config = appliance.root / "var/opt/appliance/nginx/conf/nginx.conf"
    with reconfigured(appliance, {"registry": {"listen_network": "unix"}}) as run:
        assert "registry (changed and started)" in run.stdout, run.stdout
        assert "+ service nginx (reloaded)" in run.stdout
        assert appliance.pids()["registry"] != before["registry"]
        assert appliance.pids()["nginx"] == before["nginx"]
        assert f"server unix:{sock} max_fails=0;" in nginx_config.read_text()
        assert not is_listening(http_addr)
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert sock.lstat().st_mode & 0o007 == 0  # no other local user may connect
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o2750
        if os.geteuid() == 0:  # the accounts exist: nginx's group, and nobody else's
            assert grp.getgrgid(sock.lstat().st_gid).gr_name == "appliance-www"
            outsider = subprocess.run(
                [
                    "setpriv",
                    "--reuid=nobody",
                    "--regid=nogroup",
                    "--clear-groups",
                    sys.executable,
                    "-c",
                    "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
                    str(sock),
                ],
                capture_output=True,
                text=True,
            )
            assert "PermissionError" in outsider.stderr, outsider.stderr
        image = build_image(tmp_path / "image", tag="socket")
        client.push(image, "root/socket", "socket")
        assert (
            client.pull("root/socket", "socket", tmp_path / "pulled").layer_digests
            == image.layer_digests
        )
        # kill -9 leaves the socket file behind; the registry's next start replaces it.
        appliance.kill_and_wait_back("registry")
        appliance.wait_listening()
        client.push(build_image(tmp_path / "again", tag="again"), "root/socket", "again")
        assert client.list_tags("root/socket") == ["again", "socket"]
    assert is_listening(http_addr)  # back on TCP


# ---------------------------------------------------------------- enable


def test_disabled_registry_stops_and_keeps_its_images(appliance, client, tmp_path):
    image = build_image(tmp_path / "image", tag="kept")
    client.push(image, "root/kept", "kept")
    before = appliance.wait_until_running()
    http_port = appliance.config["nginx"]["http_port"]
    storage = appliance.root / "var/opt/appliance/registry/data"

    def plain_http_answer() -> tuple[int, str | None]:
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        try:
            connection.request("GET", "/v2/", headers={"Host": "localhost"})
            reply = connection.getresponse()
            return reply.status, reply.getheader("Location")
        finally:
            connection.close()

    assert plain_http_answer() == (301, f"https://{appliance.registry_address}/v2/")
    try:
        appliance.write_config({"registry": {"enable": False}})
        converge(appliance)
        status = appliance.ctl("status", check=False).stdout
        assert "registry" not in status and "auth" not in status, status
        assert "run: nginx" in status  # still answers ACME challenges on the HTTP port
        assert appliance.pids()["nginx"] == before["nginx"]  # reloaded, not restarted
        # No vhost: nothing listens on the registry's port (a client sees "connection
        # refused" at once rather than a TLS error or a 404 it could mistake for a
        # missing image), and plain HTTP no longer redirects to it.
        assert not is_listening(f"127.0.0.1:{registry_port(appliance)}")
        assert plain_http_answer() == (404, None)
        assert not is_listening(appliance.config["registry"]["http_addr"])
        assert not is_listening(appliance.auth_internal_address)
        assert not is_listening(appliance.config["registry"]["debug_addr"])
        assert blob_path(storage, image.layer_digests[0]).is_file()
    finally:
        appliance.write_config({"registry": {"enable": True}})
        converge(appliance)
    pulled = client.pull("root/kept", "kept", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest
    again = build_image(tmp_path / "image", tag="after")
    client.push(again, "root/kept", "after")
    assert sorted(client.list_tags("root/kept")) == ["after", "kept"]


# ---------------------------------------------------------------- TLS: names and files


def test_certificate_follows_the_registry_host(appliance, tmp_path):
    """On the main domain's port the certificate is the main host's; on its own domain
    it is that domain's, under a file named after it, and clients verify that name."""
    port = registry_port(appliance)
    ssl_dir = appliance.root / "etc/appliance/ssl"
    nginx_config = appliance.root / "var/opt/appliance/nginx/conf/nginx.conf"
    main = ssl_dir / "localhost.crt"
    assert served_certificate(port, "localhost", cafile=main) == leaf_der(main)
    assert f"ssl_certificate {main};" in nginx_config.read_text()

    own = ssl_dir / "registry.localhost.crt"
    url = f"https://registry.localhost:{port}"
    nginx = appliance.pids()["nginx"]
    with reconfigured(appliance, {"registry_external_url": url}):
        assert own.is_file() and (ssl_dir / "registry.localhost.key").is_file()
        assert f"ssl_certificate {own};" in nginx_config.read_text()
        assert served_certificate(port, "registry.localhost", cafile=own) == leaf_der(own)
        with pytest.raises(ssl.SSLCertVerificationError):
            served_certificate(port, "registry.localhost", cafile=main)
        assert appliance.pids()["nginx"] == nginx
        # A real client on that name: resolved through a private hosts file, trusting
        # only the new certificate, logging in at the realm the registry now names.
        home = tmp_path / "named"
        (home / "certs").mkdir(parents=True)
        (home / "certs/ca.crt").write_bytes(own.read_bytes())
        (home / "hosts").write_text("127.0.0.1 localhost registry.localhost\n")
        named = NamedSkopeo(
            home=home,
            registry=f"registry.localhost:{port}",
            username="root",
            password=appliance.password,
            cert_dir=home / "certs",
            hosts_file=home / "hosts",
        )
        image = build_image(tmp_path / "image", tag="own")
        named.push(image, "root/own-domain", "own")
        assert named.digest("root/own-domain", "own") == image.manifest_digest
        challenge = https_connection(port, "registry.localhost", cafile=own)
        challenge.request("GET", "/v2/")
        reply = challenge.getresponse()
        assert reply.status == 401
        assert f'realm="{url}/jwt/auth"' in reply.getheader("WWW-Authenticate")
        challenge.close()
    assert served_certificate(port, "localhost", cafile=main) == leaf_der(main)


def install_certificate(directory: Path) -> tuple[Path, Path]:
    """A new key and certificate for localhost, written where the admin keeps them."""
    directory.mkdir(parents=True, exist_ok=True)
    key = pki.generate_private_key("ec-p256")
    (directory / "registry.key").write_bytes(key)
    (directory / "registry.crt").write_bytes(pki.self_signed_certificate(key, ["localhost"]))
    return directory / "registry.crt", directory / "registry.key"


def test_changed_certificate_files_reload_nginx_and_nothing_else(appliance, tmp_path):
    port = registry_port(appliance)
    cert, key = install_certificate(tmp_path / "admin")
    with reconfigured(
        appliance,
        {"registry_nginx": {"ssl_certificate": str(cert), "ssl_certificate_key": str(key)}},
    ):
        assert served_certificate(port, "localhost", cafile=cert) == leaf_der(cert)
        before = appliance.pids()
        first = leaf_der(cert)

        install_certificate(tmp_path / "admin")  # the admin replaces both files
        assert leaf_der(cert) != first
        run = converge(appliance)
        assert "+ service nginx (reloaded)" in run.stdout
        assert "restarted" not in run.stdout
        assert served_certificate(port, "localhost", cafile=cert) == leaf_der(cert)
        assert appliance.pids() == before  # nginx reloaded in place, nothing else touched

        unchanged = appliance.reconfigure()
        assert "reconfigure: 0/" in unchanged.stdout, unchanged.stdout
        assert "reloaded" not in unchanged.stdout and "restarted" not in unchanged.stdout
        assert appliance.pids() == before

        home = tmp_path / "client"
        (home / "certs").mkdir(parents=True)
        (home / "certs/ca.crt").write_bytes(cert.read_bytes())
        client = Skopeo(
            home=home,
            registry=appliance.registry_address,
            username="root",
            password=appliance.password,
            cert_dir=home / "certs",
        )
        image = build_image(tmp_path / "image", tag="files")
        client.push(image, "root/files-mode", "files")


def test_token_signing_key_given_in_the_config_is_the_one_the_registry_trusts(
    appliance, client, tmp_path
):
    """registry.internal_key, key_path and issuer (the guide's external-registry set-up):
    the auth service signs with that key as that issuer, the registry's bundle certifies
    the same key, both restart, and pushes go on."""
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = pki.generate_private_key("rsa-2048")
    key_path = appliance.root / "srv/keys/token-signing.key"
    key_path.parent.mkdir(parents=True)  # the admin's key directory (reconfigure needs it)
    bundle = appliance.root / "var/opt/appliance/registry/token-bundle.crt"
    serving = appliance.registry_process()
    auth_workers = worker_pids(appliance.pids()["auth"])
    with reconfigured(
        appliance,
        {
            "registry": {
                "internal_key": key.decode(),
                "key_path": str(key_path),
                "issuer": "corp-issuer",
            }
        },
    ) as run:
        # Both reload: the registry is handed over to a new process, auth's gunicorn
        # starts new workers on the new key (README, Reliability).
        assert "+ service registry (reloaded)" in run.stdout
        assert "+ service auth (reloaded)" in run.stdout
        assert "PRIVATE KEY" not in run.stdout  # the key is never echoed in a diff
        assert appliance.registry_process() != serving
        assert not set(worker_pids(appliance.pids()["auth"])) & set(auth_workers)
        assert key_path.read_bytes() == key
        assert pki.public_key_matches(bundle.read_bytes(), key)
        claims = jwt.decode(
            appliance.token("repository:root/signed:push,pull"),
            load_pem_private_key(key, None).public_key(),
            algorithms=["RS256"],
            audience="container_registry",
        )
        assert claims["iss"] == "corp-issuer"
        image = build_image(tmp_path / "image", tag="signed")
        client.push(image, "root/signed", "signed")
        assert client.digest("root/signed", "signed") == image.manifest_digest


def test_log_level_reaches_the_registry(appliance):
    log = appliance.root / "var/log/appliance/registry/current"
    with reconfigured(appliance, {"registry": {"log_level": "debug"}}):
        start = log.stat().st_size
        send_requests(appliance, 1)
        deadline = time.monotonic() + 10
        while "level=debug" not in log.read_text()[start:] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "level=debug" in log.read_text()[start:]
        start = log.stat().st_size
    send_requests(appliance, 3)
    time.sleep(0.5)
    assert "level=debug" not in log.read_text()[start:]


# ---------------------------------------------------------------- the nginx vhost


def handshake(port: int, version: ssl.TLSVersion, cafile: Path) -> str:
    """The protocol nginx agrees on with a client offering only `version`."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version()


def test_vhost_port_and_protocols_change_by_reload(appliance):
    """registry_nginx.listen_port (a load balancer in front forwards the URL's port to
    it) and ssl_protocols: nginx moves and tightens without a restart."""
    old_port, new_port = registry_port(appliance), free_port()
    nginx = appliance.pids()["nginx"]
    assert handshake(old_port, ssl.TLSVersion.TLSv1_2, appliance.certificate) == "TLSv1.2"
    with reconfigured(
        appliance, {"registry_nginx": {"listen_port": new_port, "ssl_protocols": "TLSv1.3"}}
    ) as run:
        assert "+ service nginx (reloaded)" in run.stdout
        assert appliance.pids()["nginx"] == nginx
        assert not is_listening(f"127.0.0.1:{old_port}")
        assert handshake(new_port, ssl.TLSVersion.TLSv1_3, appliance.certificate) == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            handshake(new_port, ssl.TLSVersion.TLSv1_2, appliance.certificate)
        connection = https_connection(new_port, "localhost", appliance.certificate)
        connection.request("GET", "/v2/", headers={"Host": appliance.registry_address})
        reply = connection.getresponse()
        assert reply.status == 401
        # The realm stays the public URL: clients come in through the balancer's port.
        assert f'realm="https://{appliance.registry_address}/jwt/auth"' in reply.getheader(
            "WWW-Authenticate"
        )
        connection.close()
    assert appliance.pids()["nginx"] == nginx


# ---------------------------------------------------------------- logs


def send_requests(appliance: ApplianceUnderTest, count: int) -> None:
    """`count` requests over one TLS connection: nginx logs a line for each."""
    connection = http.client.HTTPSConnection(
        appliance.host, registry_port(appliance), context=tls_context(appliance), timeout=10
    )
    for _ in range(count):
        connection.request("GET", "/v2/", headers={"Host": appliance.registry_address})
        connection.getresponse().read()
    connection.close()


def test_every_service_logs_under_the_log_directory(appliance):
    send_requests(appliance, 3)
    logs = appliance.root / "var/log/appliance"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sizes = {
            s: (logs / s / "current").stat().st_size
            for s in ("nginx", "registry", "auth")
            if (logs / s / "current").exists()
        }
        if len(sizes) == 3 and all(sizes.values()):
            break
        time.sleep(0.2)
    assert len(sizes) == 3 and all(sizes.values()), sizes
    assert '"GET /v2/ HTTP/1.1" 401' in (logs / "nginx/current").read_text()
    assert "service=registry" in (logs / "registry/current").read_text()


def test_logs_are_capped_and_rotated(appliance):
    logs = appliance.root / "var/log/appliance/nginx"
    programs = appliance.root / "var/opt/appliance/supervisor/conf.d"
    with reconfigured(appliance, {"logging": {"max_bytes": 4096, "backups": 2}}):
        for service in ("nginx", "registry", "auth"):
            program = (programs / f"{service}.conf").read_text()
            assert "stdout_logfile_maxbytes = 4096\n" in program
            assert "stdout_logfile_backups = 2\n" in program
        send_requests(appliance, 500)  # ~75 KB of access log
        deadline = time.monotonic() + 10
        while not (logs / "current.2").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        kept = sorted(p.name for p in logs.iterdir())
        assert kept == ["current", "current.1", "current.2"]
        line = len((logs / "current.1").read_text().splitlines()[-1]) + 1
        written = 500 * line
        # supervisord rotates once a write takes the file past the cap: a file may end
        # with what nginx wrote in one go past it, never with much more.
        sizes = [(logs / name).stat().st_size for name in kept]
        assert all(size < 2 * 4096 for size in sizes), sizes
        assert sum(sizes) < written / 2, (sizes, written)
    assert "stdout_logfile_maxbytes = 52428800\n" in (programs / "nginx.conf").read_text()


# ---------------------------------------------------------------- the guide's localhost:5001

DEBIAN_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def with_hosts_file(hosts: Path) -> list[str]:
    """A command prefix that runs the rest with `hosts` as /etc/hosts, for it alone.

    Unprivileged, mount needs uid 0 of a user namespace; a nested namespace then maps
    that back to the caller's uid, so reconfigure still sees an ordinary user.
    """
    mount = 'mount --bind "$0" /etc/hosts && exec "$@"'
    if os.geteuid() == 0:
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(hosts)]
    back = f"unshare --map-user={os.geteuid()} --map-group={os.getegid()}"
    return [
        "unshare",
        "--map-root-user",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mount.replace("exec ", f"exec {back} "),
        str(hosts),
    ]


def test_localhost_addresses_as_in_the_guide_work_on_a_stock_hosts_file(tmp_path):
    """`registry_http_addr "localhost:5001"` is the guide's example. On Debian's default
    /etc/hosts `localhost` is ::1 first; the registry and the token service bind 127.0.0.1
    only, so nginx must not try ::1. The appliance runs in a mount namespace where
    /etc/hosts is Debian's stock one (this machine's has no ::1 line)."""
    appliance = ApplianceUnderTest.create(
        {
            "registry": {"http_addr": f"localhost:{free_port()}"},
            "auth": {"listen_network": "tcp", "listen_addr": f"localhost:{free_port()}"},
        },
        prefix="appliance-localhost-",
    )
    hosts = tmp_path / "hosts"
    hosts.write_text(DEBIAN_HOSTS)
    try:
        result = subprocess.run(
            [
                *with_hosts_file(hosts),
                str(BIN / "appliance-ctl"),
                "-c",
                str(appliance.config_file),
                "reconfigure",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        config = (appliance.root / "var/opt/appliance/nginx/conf/nginx.conf").read_text()
        for setting, options in (
            (appliance.config["registry"]["http_addr"], " max_fails=0"),
            (appliance.config["auth"]["listen_addr"], ""),
        ):
            assert f"server 127.0.0.1:{setting.rsplit(':', 1)[1]}{options};" in config
        client = appliance.skopeo(tmp_path / "client")
        image = build_image(tmp_path / "image", tag="local")
        client.push(image, "root/localhost", "local")
        assert client.digest("root/localhost", "local") == image.manifest_digest
        log = (appliance.root / "var/log/appliance/nginx/current").read_text()
        assert "while connecting to upstream" not in log, log
    finally:
        appliance.destroy()
