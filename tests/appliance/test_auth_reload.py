"""The token service's graceful reload: a HUP re-reads the config file (gunicorn's app
is preloaded, so its own reload would not), and a file that no longer loads is refused
while the running service goes on answering."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

from appliance.auth.config import to_mapping
from tests.support.auth_server import AuthServer, free_port, make_config


def expires_in(server: AuthServer) -> int:
    with urllib.request.urlopen(
        f"{server.url}/jwt/auth?service={server.config.service}", timeout=5
    ) as reply:
        return json.load(reply)["expires_in"]


def wait_for(condition, timeout: float = 20) -> bool:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_hup_reads_the_new_config_and_refuses_a_broken_one(tmp_path):
    config = make_config(tmp_path, port=free_port(), token_lifetime=300)
    server = AuthServer(config, tmp_path / "config.json").start()
    try:
        assert expires_in(server) == 300
        master, old_workers = server.process.pid, set(server.worker_pids())
        mapping = to_mapping(config)
        mapping["token_lifetime"] = 600
        server.config_path.write_text(json.dumps(mapping))
        server.process.send_signal(signal.SIGHUP)
        assert wait_for(
            lambda: (
                old_workers.isdisjoint(server.worker_pids())
                and len(server.worker_pids()) == config.workers
            )
        )
        assert expires_in(server) == 600  # new workers, new config, same master
        assert server.process.pid == master
        server.config_path.write_text("{not json")
        server.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in server.log_path.read_text())
        assert server.process.poll() is None
        assert expires_in(server) == 600  # still serving the last good config
        assert "Traceback" not in server.log_path.read_text()
    finally:
        server.stop()
