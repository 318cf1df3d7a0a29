"""nginx applies a changed config by reload, and a reload does not break a transfer.

DESIGN.md says a reload (HUP) never drops connections while a restart does; that is
why every nginx change notifies `reload("nginx")`. Here a real push runs across a
reconfigure that changes nginx's config.
"""

from __future__ import annotations

import threading
import time

from tests.support.appliance import ApplianceUnderTest
from tests.support.oci import build_image


def test_nginx_reload_keeps_a_push_in_flight(tmp_path):
    appliance = ApplianceUnderTest.create()
    try:
        appliance.reconfigure()
        nginx_pid = appliance.wait_until_running()["nginx"]
        client = appliance.skopeo(tmp_path / "client")
        image = build_image(tmp_path / "image", tag="big", random_bytes=384 * 1024 * 1024)
        repositories = appliance.root / "var/opt/appliance/registry/data/docker/registry/v2"
        outcome: list[BaseException | None] = []

        def push() -> None:
            try:
                client.push(image, "root/in-flight", "big")
                outcome.append(None)
            except BaseException as error:  # noqa: BLE001 - handed to the test thread
                outcome.append(error)

        pusher = threading.Thread(target=push)
        pusher.start()
        deadline = time.monotonic() + 30
        while not list(repositories.glob("repositories/root/in-flight/_uploads/*/data")):
            assert time.monotonic() < deadline and not outcome, f"no upload began: {outcome}"
            time.sleep(0.01)
        appliance.write_config({"registry_nginx": {"proxy_timeout": 600}})
        result = appliance.reconfigure()
        in_flight = pusher.is_alive()
        pusher.join(120)

        assert "nginx (reloaded)" in result.stdout
        assert outcome == [None], outcome
        assert in_flight, "the push ended before the reload; the test showed nothing"
        assert appliance.pids()["nginx"] == nginx_pid
        assert client.list_tags("root/in-flight") == ["big"]
    finally:
        appliance.destroy()
