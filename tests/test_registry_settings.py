"""Registry settings of the reference guide, observed on a running appliance.

test_recipe_registry.py shows what each setting renders; here the real registry shows
what it does with it: the debug server answers, a notification reaches a listener, an
environment variable changes the registry's answers, the s3 driver puts blobs in a
real S3-compatible server (moto), a new internal port restarts the registry and reloads
nginx, and a disabled registry stops while its images stay.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from base64 import b64encode
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.appliance import ApplianceUnderTest, free_port
from tests.support.oci import build_image

BIN = Path(sys.prefix) / "bin"


class NotificationListener:
    """A webhook endpoint on loopback recording every envelope the registry posts."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.headers: list[dict] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                listener.events.extend(json.loads(body)["events"])
                listener.headers.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, action: str, repository: str, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                target = event.get("target", {})
                if event.get("action") == action and target.get("repository") == repository \
                        and target.get("mediaType", "").endswith("manifest.v1+json"):
                    return event
            time.sleep(0.1)
        raise AssertionError(f"no {action} event for {repository}; got {self.events}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(url: str, context: ssl.SSLContext | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    return urllib.request.urlopen(request, context=context, timeout=10)


def is_listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="module")
def listener():
    listener = NotificationListener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def appliance(listener):
    debug_addr = f"127.0.0.1:{free_port()}"
    appliance = ApplianceUnderTest.create({"registry": {
        "debug_addr": debug_addr,
        "env": {"REGISTRY_HTTP_RELATIVEURLS": True},
        "notifications": [{"name": "test-listener", "url": listener.url, "timeout": "2s",
                           "threshold": 3, "backoff": "1s",
                           "headers": {"X-Appliance-Test": ["hello"]}}],
    }})
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        yield appliance
    finally:
        appliance.destroy()


def tls_context(appliance: ApplianceUnderTest) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(appliance.certificate))


def token(appliance: ApplianceUnderTest, scope: str) -> str:
    credentials = b64encode(f"root:{appliance.password}".encode()).decode()
    url = (f"https://{appliance.registry_address}/jwt/auth?service=container_registry"
           f"&scope={scope}")
    with get(url, tls_context(appliance), {"Authorization": f"Basic {credentials}"}) as reply:
        return json.load(reply)["token"]


def test_debug_server_answers_health_vars_and_metrics(appliance):
    debug = f"http://{appliance.config['registry']['debug_addr']}"
    with get(f"{debug}/debug/health") as reply:
        assert reply.status == 200
    with get(f"{debug}/debug/vars") as reply:
        assert "docker-registry" in " ".join(json.load(reply)["cmdline"])
    with get(f"{debug}/metrics") as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        assert "# TYPE go_goroutines gauge" in reply.read().decode()


def test_metrics_count_requests_to_the_registry(appliance, client_home):
    debug = f"http://{appliance.config['registry']['debug_addr']}"
    client = appliance.skopeo(client_home)
    image = build_image(client_home / "image", tag="metrics")
    client.push(image, "root/metrics", "metrics")
    with get(f"{debug}/metrics") as reply:
        metrics = reply.read().decode()
    assert "registry_http_requests_total" in metrics


def test_push_event_reaches_the_notification_listener(appliance, listener, client_home):
    client = appliance.skopeo(client_home)
    image = build_image(client_home / "image", tag="v1")
    client.push(image, "root/notified", "v1")
    event = listener.wait_for("push", "root/notified")
    assert event["target"]["digest"] == image.manifest_digest
    assert event["target"]["tag"] == "v1"
    assert any(h.get("X-Appliance-Test") == "hello" for h in listener.headers)


def test_registry_env_reaches_the_registry(appliance):
    """REGISTRY_HTTP_RELATIVEURLS=true: upload Locations come back relative."""
    bearer = token(appliance, "repository:root/relative:push,pull")
    request = urllib.request.Request(
        f"https://{appliance.registry_address}/v2/root/relative/blobs/uploads/", method="POST",
        headers={"Authorization": f"Bearer {bearer}", "Content-Length": "0"})
    with urllib.request.urlopen(request, context=tls_context(appliance), timeout=10) as reply:
        assert reply.status == 202
        assert reply.headers["Location"].startswith("/v2/root/relative/blobs/uploads/")


@pytest.fixture
def client_home(tmp_path: Path) -> Path:
    return tmp_path / "client"


# ---------------------------------------------------------------- s3


@pytest.fixture
def s3_server():
    port = free_port()
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not is_listening(f"127.0.0.1:{port}"):
            assert process.poll() is None, "moto_server exited"
            assert time.monotonic() < deadline, "moto_server did not listen"
            time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(10)


def s3_client(endpoint: str):  # noqa: ANN201
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_s3_storage_puts_the_pushed_blobs_in_the_bucket(s3_server, tmp_path):
    s3_client(s3_server).create_bucket(Bucket="registry")
    appliance = ApplianceUnderTest.create({"registry": {"storage": {
        "s3": {"accesskey": "testing", "secretkey": "testing", "bucket": "registry",
               "region": "us-east-1", "regionendpoint": s3_server, "secure": False,
               "v4auth": True, "chunksize": 5 * 1024 * 1024, "rootdirectory": "/images"},
        "redirect": {"disable": True},
    }}})
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        client = appliance.skopeo(tmp_path / "client")
        image = build_image(tmp_path / "image", tag="v1", random_bytes=6 * 1024 * 1024)
        client.push(image, "root/on-s3", "v1")
        keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(
            Bucket="registry", Prefix="images/")["Contents"]]
        for digest in (*image.layer_digests, image.config_digest, image.manifest_digest):
            hex_digest = digest.split(":")[1]
            blob = f"images/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
            assert blob in keys
        pulled = client.pull("root/on-s3", "v1", tmp_path / "pulled")
        assert pulled.layer_digests == image.layer_digests
        local = appliance.root / "var/opt/appliance/registry/data"
        assert not local.exists() or not any(local.iterdir())
    finally:
        appliance.destroy()


# ---------------------------------------------------------------- lifecycle


@pytest.fixture
def plain_appliance():
    appliance = ApplianceUnderTest.create()
    try:
        appliance.reconfigure()
        appliance.wait_until_running()
        yield appliance
    finally:
        appliance.destroy()


def test_new_internal_port_restarts_the_registry_and_reloads_nginx(plain_appliance, tmp_path):
    appliance = plain_appliance
    before = appliance.wait_until_running()
    old_addr = appliance.config["registry"]["http_addr"]
    new_addr = f"127.0.0.1:{free_port()}"
    appliance.write_config({"registry": {"http_addr": new_addr}})
    result = appliance.reconfigure()
    assert "registry (restarted)" in result.stdout
    assert "nginx (reloaded)" in result.stdout
    after = appliance.wait_until_running()
    assert after["registry"] != before["registry"]
    assert after["nginx"] == before["nginx"]  # reloaded in place: connections survive
    assert is_listening(new_addr) and not is_listening(old_addr)
    client = appliance.skopeo(tmp_path / "client")
    image = build_image(tmp_path / "image", tag="moved")
    client.push(image, "root/moved", "moved")
    assert client.list_tags("root/moved") == ["moved"]


def test_disabled_registry_stops_and_keeps_its_images(plain_appliance, tmp_path):
    appliance = plain_appliance
    client = appliance.skopeo(tmp_path / "client")
    image = build_image(tmp_path / "image", tag="kept")
    client.push(image, "root/kept", "kept")
    before = appliance.wait_until_running()

    appliance.write_config({"registry": {"enable": False}})
    appliance.reconfigure()
    status = appliance.ctl("status", check=False).stdout
    assert "registry" not in status and "auth" not in status, status
    assert "run: nginx" in status  # still answers ACME challenges on the HTTP port
    assert appliance.pids()["nginx"] == before["nginx"]
    assert not is_listening(f"127.0.0.1:{appliance.registry_address.rsplit(':', 1)[1]}")
    assert not is_listening(appliance.config["registry"]["http_addr"])
    blobs = appliance.root / "var/opt/appliance/registry/data/docker/registry/v2/blobs"
    assert any(blobs.rglob("data"))

    appliance.write_config({"registry": {"enable": True}})
    appliance.reconfigure()
    appliance.wait_until_running()
    pulled = client.pull("root/kept", "kept", tmp_path / "pulled")
    assert pulled.manifest_digest == image.manifest_digest
