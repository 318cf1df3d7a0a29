"""The nginx recipe: the one config file per setting, checked by the real `nginx -t`, and
which service each file notifies.

`nginx -t` takes milliseconds and is the judge that matters: a config that renders but
that nginx refuses would fail the reload on a live host.
"""

from __future__ import annotations

import http.client
import http.server
import shlex
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from appliance import pki
from appliance.errors import ConfigError, ResourceError
from appliance.resources import reload
from recipes import nginx, supervisor
from tests.support.appliance import free_port
from tests.support.recipes import SECRETS, settings_for


def nginx_config(settings) -> str:
    [config] = [
        r
        for r in nginx.resources(settings, SECRETS)
        if getattr(r, "path", None) == settings.paths.nginx_config
    ]
    return config.content.decode()


def with_certificate(settings) -> None:
    """The certificate files the TLS recipe would have written before nginx's config."""
    rn = settings.registry_nginx
    key = pki.generate_private_key("ec-p256")
    Path(rn.ssl_certificate).parent.mkdir(parents=True, exist_ok=True)
    Path(rn.ssl_certificate_key).write_bytes(key)
    Path(rn.ssl_certificate).write_bytes(pki.self_signed_certificate(key, [settings.registry_host]))


def nginx_accepts(settings, content: str) -> subprocess.CompletedProcess:
    """Write the config where reconfigure would and run the real `nginx -t` on it."""
    for path in (nginx.temp_dir(settings), settings.paths.nginx_config.parent):
        path.mkdir(parents=True, exist_ok=True)
    settings.paths.nginx_config.write_text(content)
    return subprocess.run(
        [*nginx.command(settings, settings.paths.nginx_config), "-t"],
        capture_output=True,
        text=True,
    )


def server_blocks(config: str) -> list[str]:
    """The text of each `server { ... }` block."""
    blocks, depth, current = [], 0, None
    for line in config.splitlines():
        stripped = line.strip()
        if stripped == "server {" and depth == 1:
            current = []
        if current is not None:
            current.append(stripped)
        depth += stripped.count("{") - stripped.count("}")
        if current is not None and depth == 1:
            blocks.append("\n".join(current))
            current = None
    return blocks


def test_default_config_passes_nginx_t_and_proxies_registry_and_auth(tmp_path):
    settings = settings_for(tmp_path)
    with_certificate(settings)
    config = nginx_config(settings)
    result = nginx_accepts(settings, config)
    assert result.returncode == 0, result.stderr
    tls, http = server_blocks(config)
    assert "listen *:5050 ssl;" in tls
    assert f"ssl_certificate {tmp_path}/etc/appliance/ssl/localhost.crt;" in tls
    assert f"ssl_certificate_key {tmp_path}/etc/appliance/ssl/localhost.key;" in tls
    assert "server 127.0.0.1:5000 max_fails=0;" in config  # registry.http_addr
    # auth.listen_network: unix, the default
    assert f"server unix:{tmp_path}/var/opt/appliance/auth-socket/auth.sock;" in config
    assert "location /v2/ {\nproxy_pass http://$registry_pool;" in tls
    assert "location = /jwt/auth {\nproxy_pass http://auth;" in tls
    assert "location = /-/health {\nproxy_pass http://auth;" in tls
    # the admin API, the web pages and their static files (issue 16)
    for path in ("/api/", "/static/", "/"):
        assert f"location {path} {{\nproxy_pass http://auth;" in tls
    assert "listen *:80;" in http
    assert "return 301 https://localhost:5050$request_uri;" in http
    assert f"root {tmp_path}/var/opt/appliance/nginx/acme-webroot;" in http
    assert "user " not in config  # an ordinary user's nginx has no one to switch to


@pytest.mark.parametrize(
    "directive",
    [
        "proxy_set_header Host $http_host;",  # the port stays in upload Locations
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $remote_addr;",  # never the client's own list
        "client_max_body_size 0;",
        "chunked_transfer_encoding on;",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_read_timeout 900s;",
        "proxy_send_timeout 900s;",
    ],
)
def test_registry_vhost_has_the_proxy_settings_of_design(tmp_path, directive):
    tls, _ = server_blocks(nginx_config(settings_for(tmp_path)))
    assert directive in tls.splitlines()


def test_every_writable_path_is_under_the_prefix(tmp_path):
    config = nginx_config(settings_for(tmp_path))
    prefix = tmp_path / "var/opt/appliance/nginx"
    for directive in (
        "client_body_temp_path",
        "proxy_temp_path",
        "fastcgi_temp_path",
        "uwsgi_temp_path",
        "scgi_temp_path",
        "pid",
    ):
        [line] = [x.strip() for x in config.splitlines() if x.strip().startswith(directive + " ")]
        assert line.split()[1].startswith(str(prefix)), line
    assert "error_log stderr" in config and "access_log /dev/stdout;" in config


def test_upstreams_keep_connections_alive(tmp_path):
    # A root too deep for a standby socket (107 bytes): the registry's address alone.
    config = nginx_config(settings_for(tmp_path / ("deep" * 20), auth={"listen_network": "tcp"}))
    assert (
        "upstream registry {\n        server 127.0.0.1:5000 max_fails=0;\n"
        "        keepalive 32;" in config
    )


def test_internal_addresses_change_the_upstreams(tmp_path):
    settings = settings_for(
        tmp_path,
        registry={"http_addr": "127.0.0.1:6000"},
        auth={"listen_network": "tcp", "listen_addr": "127.0.0.1:6100"},
    )
    config = nginx_config(settings)
    assert "server 127.0.0.1:6000 max_fails=0;" in config and "server 127.0.0.1:6100;" in config


def test_registry_on_a_socket_is_the_upstream():
    root = Path("/srv/appliance")  # pytest's tmp_path is too long for a socket path
    config = nginx_config(settings_for(root, registry={"listen_network": "unix"}))
    assert (
        "upstream registry {\n        server unix:/srv/appliance/var/opt/appliance/"
        "registry-socket/registry.sock max_fails=0;\n        server unix:/srv/appliance/"
        "var/opt/appliance/registry-socket/standby.sock max_fails=0 backup;" in config
    )


def test_registry_upstream_lists_the_standby_socket_and_keeps_connections_short():
    # A handover (appliance/programs/registry.py) runs the new registry on the standby
    # socket while the old one drains: nginx must reach both, and hold no upstream
    # connection longer than the wrapper waits before it stops a retired registry.
    from recipes.registry import SETTLE_SECONDS

    config = nginx_config(settings_for(Path("/srv/appliance")))
    assert (
        "upstream registry {\n        server 127.0.0.1:5000 max_fails=0;\n"
        "        server unix:/srv/appliance/var/opt/appliance/registry-socket/"
        "standby.sock max_fails=0 backup;\n        keepalive 32;\n        keepalive_time 1s;\n"
        "        keepalive_timeout 2s;\n    }" in config
    )
    assert SETTLE_SECONDS > 1 + 2  # the wrapper outwaits both


def test_registry_on_its_own_domain_listens_on_443_with_that_domains_certificate(tmp_path):
    settings = settings_for(
        tmp_path,
        external_url="https://gitlab.example.com",
        registry_external_url="https://registry.example.com",
        letsencrypt={"enable": False},
    )
    with_certificate(settings)
    config = nginx_config(settings)
    assert nginx_accepts(settings, config).returncode == 0
    tls, http = server_blocks(config)
    assert "listen *:443 ssl;" in tls
    assert "server_name registry.example.com;" in tls
    assert f"ssl_certificate {tmp_path}/etc/appliance/ssl/registry.example.com.crt;" in tls
    assert "return 301 https://registry.example.com$request_uri;" in http


def test_registry_on_the_main_domain_uses_port_5050_and_the_main_certificate(tmp_path):
    settings = settings_for(
        tmp_path, external_url="https://gitlab.example.com", letsencrypt={"enable": False}
    )
    tls, _ = server_blocks(nginx_config(settings))
    assert "listen *:5050 ssl;" in tls
    assert f"ssl_certificate {tmp_path}/etc/appliance/ssl/gitlab.example.com.crt;" in tls


def test_admin_certificate_paths_and_listen_port(tmp_path):
    cert, key = tmp_path / "certs/registry.pem", tmp_path / "certs/registry.key"
    settings = settings_for(
        tmp_path,
        registry_nginx={
            "ssl_certificate": str(cert),
            "ssl_certificate_key": str(key),
            "listen_port": 8443,
            "ssl_protocols": "TLSv1.3",
            "proxy_timeout": 60,
        },
    )
    with_certificate(settings)
    config = nginx_config(settings)
    assert nginx_accepts(settings, config).returncode == 0
    tls, _ = server_blocks(config)
    assert f"ssl_certificate {cert};" in tls and f"ssl_certificate_key {key};" in tls
    assert "listen *:8443 ssl;" in tls
    assert "ssl_protocols TLSv1.3;" in config
    assert "proxy_read_timeout 60s;" in tls


def test_listen_addresses_ipv4_ipv6_and_any(tmp_path):
    settings = settings_for(
        tmp_path, nginx={"listen_addresses": ["127.0.0.1", "::1", "[::]"], "http_port": 8080}
    )
    tls, http = server_blocks(nginx_config(settings))
    assert [x for x in tls.splitlines() if x.startswith("listen")] == [
        "listen 127.0.0.1:5050 ssl;",
        "listen [::1]:5050 ssl;",
        "listen [::]:5050 ssl;",
    ]
    assert [x for x in http.splitlines() if x.startswith("listen")] == [
        "listen 127.0.0.1:8080;",
        "listen [::1]:8080;",
        "listen [::]:8080;",
    ]


def test_disabled_registry_removes_the_vhost_and_keeps_the_challenge_server(tmp_path):
    settings = settings_for(tmp_path, registry={"enable": False})
    config = nginx_config(settings)
    assert nginx_accepts(settings, config).returncode == 0  # no certificate needed
    [http] = server_blocks(config)
    assert "upstream" not in config and " ssl;" not in config
    assert "acme-challenge" in http and "return 404;" in http


def test_redirect_to_https_can_be_turned_off(tmp_path):
    _, http = server_blocks(
        nginx_config(settings_for(tmp_path, nginx={"redirect_http_to_https": False}))
    )
    assert "return 301" not in http and "return 404;" in http


def test_as_root_workers_run_as_the_web_account(tmp_path):
    settings = settings_for(tmp_path, run_as_root=True)
    assert "user appliance-www;" in nginx_config(settings)
    [temp] = [
        r
        for r in nginx.resources(settings, SECRETS)
        if getattr(r, "path", None) == nginx.temp_dir(settings)
    ]
    # Debian's layout: root's parent, worker-owned children that the master creates.
    assert (temp.owner, temp.mode) == ("root", 0o755)


def test_worker_processes_setting(tmp_path):
    config = nginx_config(settings_for(tmp_path, nginx={"worker_processes": "3"}))
    assert "worker_processes 3;" in config


def supervisor_launched(argv: list[str], settings) -> list[str]:
    """The program's own command, behind the launcher that ties it to supervisord."""
    prefix = supervisor.launched(settings, "nginx", [])
    assert argv[: len(prefix)] == prefix
    return argv[len(prefix) :]


def test_config_change_reloads_nginx_and_the_program_stops_it_gracefully(tmp_path):
    settings = settings_for(tmp_path)
    resources = nginx.resources(settings, SECRETS)
    [config] = [r for r in resources if getattr(r, "path", None) == settings.paths.nginx_config]
    assert config.notifies == (reload("nginx"),)
    [program] = [
        r
        for r in resources
        if getattr(r, "path", None) == supervisor.programs_dir(settings) / "nginx.conf"
    ]
    text = program.content.decode()
    assert "stopsignal = QUIT" in text
    [command] = [x for x in text.splitlines() if x.startswith("command = ")]
    argv = supervisor_launched(shlex.split(command.removeprefix("command = ")), settings)
    # The launcher retires a killed master's orphaned workers, then execs nginx.
    assert argv == [
        supervisor.executable("python"),
        "-m",
        "appliance.programs.nginx",
        str(nginx.pid_file(settings)),
        "/usr/sbin/nginx",
        "-e",
        "stderr",
        "-p",
        str(nginx.prefix(settings)),
        "-c",
        str(settings.paths.nginx_config),
        "-g",
        "daemon off;",
    ]


def test_a_config_nginx_refuses_never_replaces_the_live_one(tmp_path):
    settings = settings_for(tmp_path)
    with_certificate(settings)
    [config] = [
        r
        for r in nginx.resources(settings, SECRETS)
        if getattr(r, "path", None) == settings.paths.nginx_config
    ]
    nginx.temp_dir(settings).mkdir(parents=True)
    settings.paths.nginx_config.parent.mkdir(parents=True)
    config.apply()
    live = settings.paths.nginx_config.read_bytes()

    Path(settings.registry_nginx.ssl_certificate).unlink()  # nginx -t must now fail
    config.content = live.replace(b"worker_connections 4096;", b"worker_connections 2048;")
    with pytest.raises(ResourceError, match="nginx refused the new configuration"):
        config.apply()
    assert settings.paths.nginx_config.read_bytes() == live
    assert [p.name for p in settings.paths.nginx_config.parent.iterdir()] == ["nginx.conf"]


@pytest.mark.parametrize("protocols", ["TLSv1.2; include /etc/passwd", "SSLv3", ""])
def test_ssl_protocols_cannot_carry_anything_but_protocol_names(tmp_path, protocols):
    with pytest.raises(ConfigError) as refused:
        settings_for(tmp_path, registry_nginx={"ssl_protocols": protocols})
    assert any(p.startswith("registry_nginx.ssl_protocols:") for p in refused.value.problems)


def test_hsts_on_every_answer_of_the_registry_vhost_by_default(tmp_path):
    tls, http = server_blocks(nginx_config(settings_for(tmp_path)))
    assert 'add_header Strict-Transport-Security "max-age=63072000" always;' in tls.splitlines()
    assert "Strict-Transport-Security" not in http  # HSTS over plain HTTP means nothing
    assert "add_header" not in "\n".join(  # a location's add_header would drop the server's
        line for line in tls.splitlines() if not line.startswith("add_header Strict")
    )


def test_hsts_max_age_is_a_setting_and_zero_turns_it_off(tmp_path):
    settings = settings_for(tmp_path, registry_nginx={"hsts_max_age": 300})
    with_certificate(settings)
    config = nginx_config(settings)
    assert nginx_accepts(settings, config).returncode == 0
    assert 'add_header Strict-Transport-Security "max-age=300" always;' in config
    off = nginx_config(settings_for(tmp_path, registry_nginx={"hsts_max_age": 0}))
    assert "Strict-Transport-Security" not in off


def location(tls: str, prefix: str) -> list[str]:
    lines = tls.splitlines()
    start = lines.index(prefix)
    return lines[start : lines.index("}", start)]


def test_only_blob_transfers_stream_bodies_and_small_bodies_have_timeouts(tmp_path):
    tls, _ = server_blocks(
        nginx_config(settings_for(tmp_path, registry_nginx={"proxy_timeout": 600}))
    )
    server_level = [line for line in tls.splitlines() if not line.startswith("location")]
    for directive in (
        "client_max_body_size 64k;",
        "proxy_request_buffering on;",
        "client_header_timeout 10s;",
        "client_body_timeout 10s;",
        "send_timeout 10s;",
    ):
        assert directive in server_level, directive
    v2 = location(tls, "location /v2/ {")
    for directive in ("client_max_body_size 0;", "client_body_timeout 600s;", "send_timeout 600s;"):
        assert directive in v2, directive
    streamed = location(tls, "location @registry_streamed {")
    for directive in (
        "client_max_body_size 0;",
        "proxy_request_buffering off;",
        "client_body_timeout 600s;",
        "send_timeout 600s;",
    ):
        assert directive in streamed, directive
    for path in ("location = /jwt/auth {", "location = /-/health {"):
        assert location(tls, path) == [path, "proxy_pass http://auth;"]


def test_no_client_supplied_forwarding_header_reaches_the_upstreams(tmp_path):
    config = nginx_config(settings_for(tmp_path))
    assert "$proxy_add_x_forwarded_for" not in config
    assert "$http_x_" not in config


def test_temp_paths_sit_in_a_root_owned_parent_like_debians(tmp_path):
    settings = settings_for(tmp_path, run_as_root=True)
    config = nginx_config(settings)
    temp = tmp_path / "var/opt/appliance/nginx/temp"
    for directive, name in (
        ("client_body_temp_path", "body"),
        ("proxy_temp_path", "proxy"),
        ("fastcgi_temp_path", "fastcgi"),
        ("uwsgi_temp_path", "uwsgi"),
        ("scgi_temp_path", "scgi"),
    ):
        assert f"    {directive} {temp}/{name};\n" in config
    # nginx creates the children and hands them to the workers; the recipe declares no
    # worker-owned directory a root process would later follow.
    web = [
        r
        for r in nginx.resources(settings, SECRETS)
        if getattr(r, "owner", None) == "appliance-www"
    ]
    assert web == []


def test_small_registry_requests_may_be_retried_large_bodies_stream(tmp_path):
    # A registry retiring in a handover closes its idle connections; a request nginx
    # sent on one just then is sent again to the other registry, which nginx can do
    # only with the body in hand: bodyless and small requests are read first, layers
    # (large or chunked) stream as before.
    tls, _ = server_blocks(nginx_config(settings_for(tmp_path)))
    config = nginx_config(settings_for(tmp_path))
    assert '":" buffered;' in config and '"~^:[0-9]{1,6}$" buffered;' in config
    assert "default streamed;" in config
    v2 = tls[tls.index("location /v2/ {") : tls.index("location @registry_streamed")]
    for directive in (
        "proxy_request_buffering on;",
        "proxy_next_upstream error timeout non_idempotent;",
        "error_page 418 = @registry_streamed;",
        "if ($registry_body = streamed) {",
    ):
        assert directive in v2.splitlines(), directive
    streamed = location(tls, "location @registry_streamed {")
    assert streamed[:2] == ["location @registry_streamed {", "proxy_pass http://registry_once;"]
    assert "proxy_request_buffering off;" in streamed


class RecordingRegistry(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 upstream that notes, for each request, the connection it came on."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []  # method, path, nginx's source port

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one_request(self) -> None:  # noqa: D102 - every method alike
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline or not self.parse_request():
                    self.close_connection = True
                    return
                if self.headers.get("Transfer-Encoding") == "chunked":
                    while size := int(self.rfile.readline(), 16):
                        self.rfile.read(size + 2)
                    self.rfile.readline()
                else:
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.seen.append((self.command, self.path, self.client_address[1]))
                self.send_response(202 if self.command == "PATCH" else 201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = self
        super().__init__(("127.0.0.1", 0), Handler)


def test_what_must_not_run_twice_reaches_the_registry_on_a_new_connection(tmp_path):
    # A registry retiring in a handover may close an idle connection on which it has
    # just read a request, and still carry the request out (golang/go#65802): nginx
    # then sends it to the other registry too. An upload's final PUT or a DELETE done
    # twice fails the second time, so nginx never sends one on a reused connection; a
    # pull may be repeated and keeps its connections. The real nginx, before a registry
    # that records which connection each request came on.
    registry = RecordingRegistry()
    threading.Thread(target=registry.serve_forever, daemon=True).start()
    port = free_port()
    settings = settings_for(
        tmp_path,
        registry_external_url=f"https://localhost:{port}",
        nginx={"http_port": free_port(), "listen_addresses": ["127.0.0.1"]},
        registry={"http_addr": f"127.0.0.1:{registry.server_address[1]}"},
    )
    with_certificate(settings)
    assert nginx_accepts(settings, nginx_config(settings)).returncode == 0
    server = subprocess.Popen(
        [*nginx.command(settings, settings.paths.nginx_config), "-g", "daemon off;"],
        stderr=subprocess.PIPE,
    )
    try:
        context = ssl.create_default_context(cafile=settings.registry_nginx.ssl_certificate)
        client = http.client.HTTPSConnection("localhost", port, context=context)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.connect()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and server.poll() is None, "nginx did not start"
                time.sleep(0.05)
        upload = "/v2/a/blobs/uploads/7f0e?_state=s&digest=sha256:" + "0" * 64
        requests = [
            ("GET", "/v2/a/blobs/sha256:" + "1" * 64, None),
            ("GET", "/v2/a/manifests/latest", None),
            ("PUT", upload, b"config"),
            ("PUT", upload, b""),
            ("DELETE", "/v2/a/blobs/sha256:" + "2" * 64, None),
            ("PATCH", "/v2/a/blobs/uploads/7f0e", b"x" * (2 * 1024 * 1024)),
            ("HEAD", "/v2/a/blobs/sha256:" + "1" * 64, None),
            ("GET", "/v2/", None),
        ]
        for method, path, body in requests:
            client.request(method, path, body=body)
            client.getresponse().read()
        client.close()
    finally:
        server.terminate()
        server.wait(10)
        registry.shutdown()
    assert [(method, path) for method, path, _ in registry.seen] == [
        (method, path) for method, path, _ in requests
    ]
    once = [port for method, _, port in registry.seen if method in ("PUT", "DELETE", "PATCH")]
    again = [port for method, _, port in registry.seen if method in ("GET", "HEAD")]
    assert len(set(once)) == len(once) and not set(once) & set(again), registry.seen
    assert len(set(again)) < len(again), registry.seen  # pulls keep their connection


def test_manifest_writes_pass_the_tag_rules_first_and_nothing_else_does(tmp_path):
    settings = settings_for(tmp_path)
    with_certificate(settings)
    config = nginx_config(settings)
    assert nginx_accepts(settings, config).returncode == 0
    assert '"~^(PUT|DELETE):/v2/.+/manifests/[^/]+$" 1;' in config
    gate = config[config.index("location @tag_rules {") :]
    gate = gate[: gate.index("}")]
    assert "proxy_pass http://auth;" in gate
    assert "error_page 460 = @registry_manifest;" in gate
    assert "client_body_buffer_size 4m;" in gate  # the body stays in memory: sent twice
    assert "proxy_pass_request_body off" not in config  # the gate needs the manifest
    v2 = config[config.index("location /v2/ {") :]
    v2 = v2[: v2.index("location @registry_streamed")]
    # The gate's test comes before the streamed one: a chunked manifest PUT is gated too.
    assert v2.index("if ($manifest_write)") < v2.index("if ($registry_body = streamed)")


def test_no_gate_without_the_token_service(tmp_path):
    settings = settings_for(tmp_path, auth={"enable": False})
    with_certificate(settings)
    config = nginx_config(settings)
    assert "manifest_write" not in config and "@tag_rules" not in config
    assert nginx_accepts(settings, config).returncode == 0
