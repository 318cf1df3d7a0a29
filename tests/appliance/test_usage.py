"""Usage, soft quotas, metrics and the push and pull history, on a running appliance.

One appliance (real registry, nginx, token service, skopeo) serves the module; the tests
run in order, each building on the content the ones before pushed:
- `usage --json` counts a base layer two projects share once in the total, shows it as
  shared in both, and every figure is the sum of the pushed blobs' sizes;
- a push moves the project's figure (metrics) without `usage` being run: the registry's
  events reach the auth service;
- the history records who pushed and pulled which digest, and when;
- above its quota a project's pushes are refused with the sentence (skopeo prints it,
  the audit log has it), pulls and deletes go on; a raised quota lets pushes in again;
- /metrics answers on the internal listener only, never through nginx.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request

import pytest

from appliance.auth.sizes import format_size
from tests.support.appliance import ApplianceUnderTest
from tests.support.oci import OciImage, build_image
from tests.support.skopeo import Skopeo, SkopeoError

BASE = {"base.bin": os.urandom(64 * 1024)}  # random: the layer does not compress away


@pytest.fixture(scope="module")
def appliance():
    appliance = ApplianceUnderTest.create(prefix="appliance-usage-")
    try:
        appliance.reconfigure()
        appliance.wait_listening()
        for path in ("alpha/app", "beta/app"):
            appliance.ctl("project", "create", path)
        yield appliance
    finally:
        appliance.destroy()


@pytest.fixture(scope="module")
def client(appliance: ApplianceUnderTest, tmp_path_factory) -> Skopeo:
    return appliance.skopeo(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, OciImage]:
    """Two images on one base layer, and one without it."""
    work = tmp_path_factory.mktemp("images")
    return {
        "a": build_image(work / "a", "v1", {"a.txt": os.urandom(4096)}, base=BASE),
        "b": build_image(work / "b", "v1", {"b.txt": os.urandom(4096)}, base=BASE),
        "c": build_image(work / "c", "v1", {"c.txt": os.urandom(4096)}),
        "d": build_image(work / "d", "v1", {"d.txt": os.urandom(4096)}),
    }


def blobs(image: OciImage) -> dict[str, int]:
    """Every blob a push of `image` stores (layers, config, manifest) with its size."""
    digests = [*image.layer_digests, image.config_digest, image.manifest_digest]
    directory = image.layout / "blobs/sha256"
    return {d: (directory / d.split(":", 1)[1]).stat().st_size for d in digests}


def usage(appliance: ApplianceUnderTest) -> dict:
    return json.loads(appliance.ctl("usage", "--json").stdout)


def metrics(appliance: ApplianceUnderTest) -> dict[str, float]:
    """The samples of /metrics on the auth service's internal listener."""
    url = f"http://{appliance.config['auth']['internal_addr']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def wait_for(condition, timeout: float = 20, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def history(appliance: ApplianceUnderTest, repository: str, action: str) -> list[dict]:
    result = appliance.ctl("history", repository, "--action", action, "--json")
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_shared_base_layer_counts_once_in_the_total_and_as_shared_in_both_projects(
    appliance, client, images
):
    client.push(images["a"], "alpha/app/one", "v1")
    client.push(images["b"], "beta/app/two", "v1")
    a, b = blobs(images["a"]), blobs(images["b"])
    base = images["a"].layer_digests[0]
    assert base == images["b"].layer_digests[0]
    figures = usage(appliance)
    assert figures["total_bytes"] == sum({**a, **b}.values())
    assert figures["total_bytes"] == sum(a.values()) + sum(b.values()) - a[base]
    assert figures["reclaimable_bytes"] == 0
    projects = figures["projects"]
    assert projects["alpha/app"]["bytes"] == sum(a.values())
    assert projects["beta/app"]["bytes"] == sum(b.values())
    assert projects["alpha/app"]["shared_bytes"] == projects["beta/app"]["shared_bytes"] == a[base]
    assert figures["repositories"]["alpha/app/one"]["project"] == "alpha/app"
    # The figures file is what the auth service reads: readable by its account.
    stat = (appliance.root / "var/opt/appliance/registry-usage.json").stat()
    assert stat.st_mode & 0o777 == 0o644
    printed = appliance.ctl("usage").stdout
    assert "alpha/app" in printed and "Reclaimable by garbage collection: 0 B" in printed
    assert "alpha/app/one" in appliance.ctl("usage", "--by", "repo").stdout


def test_metrics_show_each_projects_bytes_and_the_total(appliance, images):
    a, b = blobs(images["a"]), blobs(images["b"])
    samples = metrics(appliance)
    assert samples['appliance_storage_bytes{project="alpha/app"}'] == sum(a.values())
    assert samples['appliance_storage_bytes{project="beta/app"}'] == sum(b.values())
    assert samples["appliance_storage_bytes_total"] == sum({**a, **b}.values())
    assert samples["appliance_gc_runs_total"] == 0


def test_gc_figures_are_exported_from_the_gc_stats_file(appliance):
    stats = {
        "runs": 3,
        "freed_bytes_total": 123456,
        "freed_blobs_total": 7,
        "last": {
            "started": 1764300000,
            "finished": 1764300042,
            "dry_run": False,
            "freed_bytes": 1000,
            "freed_blobs": 2,
        },
    }
    path = appliance.root / "var/opt/appliance/registry-gc.json"
    path.write_text(json.dumps(stats))
    path.chmod(0o644)
    try:
        samples = metrics(appliance)
        assert samples["appliance_gc_runs_total"] == 3
        assert samples["appliance_gc_freed_bytes_total"] == 123456
        assert samples["appliance_gc_freed_blobs_total"] == 7
        assert samples["appliance_gc_last_freed_bytes"] == 1000
        assert samples["appliance_gc_last_finished_timestamp_seconds"] == 1764300042
    finally:
        path.unlink()


def test_a_push_moves_the_figure_without_usage_being_run(appliance, client, images):
    before = metrics(appliance)['appliance_storage_bytes{project="alpha/app"}']
    client.push(images["c"], "alpha/app/three", "v1")
    expected = before + sum(blobs(images["c"]).values())
    wait_for(
        lambda: metrics(appliance)['appliance_storage_bytes{project="alpha/app"}'] == expected,
        what="the push's events to reach the figure",
    )
    shown = appliance.ctl("project", "show", "alpha/app").stdout
    assert f"({int(expected)} bytes)" in shown


def test_history_records_the_pusher_time_and_digest_and_the_puller(
    appliance, client, images, tmp_path
):
    pushed = wait_for(lambda: history(appliance, "alpha/app/three", "push"), what="the push")
    [event] = pushed
    assert (event["actor"], event["digest"], event["tag"]) == (
        "root",
        images["c"].manifest_digest,
        "v1",
    )
    assert abs(event["at"] - time.time()) < 120
    assert event["address"] == "127.0.0.1"
    client.pull("alpha/app/three", "v1", tmp_path / "pulled")
    pulled = wait_for(lambda: history(appliance, "alpha/app/three", "pull"), what="the pull")
    assert (pulled[0]["actor"], pulled[0]["digest"]) == ("root", images["c"].manifest_digest)
    # A blob pull is sent to no endpoint of the appliance: only the manifest's pull.
    assert all(e["media_type"] != "application/octet-stream" for e in pulled)
    table = appliance.ctl("history", "alpha/app").stdout
    assert "push" in table and "pull" in table and "alpha/app/three" in table


def test_over_its_quota_a_project_refuses_pushes_with_the_reason_and_serves_pulls(
    appliance, client, images, tmp_path
):
    used = usage(appliance)["projects"]["alpha/app"]["bytes"]
    result = appliance.ctl("project", "update", "alpha/app", "--quota", "10KiB")
    assert "over it: pushes are refused" in result.stdout
    [row] = [r for r in appliance.ctl("project", "list").stdout.splitlines() if "alpha" in r]
    assert row.split()[3:6] == [*format_size(used).split(), "10", "KiB"][:3] or "10 KiB" in row
    with pytest.raises(SkopeoError) as refused:
        client.push(images["d"], "alpha/app/one", "v2")
    sentence = f"alpha/app uses {format_size(used)} of its 10 KiB quota"
    assert sentence in refused.value.stderr
    audit = (appliance.root / "var/log/appliance/audit/audit.log").read_text().splitlines()
    refusals = [json.loads(line) for line in audit if sentence in line]
    assert refusals and refusals[-1]["status"] == 401 and refusals[-1]["result"] == "refused"
    # Pulls go on, and so do deletes (skopeo delete asks for `*`): the way to make room.
    client.pull("alpha/app/one", "v1", tmp_path / "still")
    client.delete("alpha/app/three", "v1")
    # Another project is not affected.
    client.push(images["d"], "beta/app/two", "v2")


def test_a_raised_quota_lets_pushes_in_again(appliance, client, images):
    appliance.ctl("project", "update", "alpha/app", "--quota", "1GiB")
    client.push(images["d"], "alpha/app/one", "v2")
    shown = appliance.ctl("project", "show", "alpha/app").stdout
    assert "quota:      1 GiB" in shown
    appliance.ctl("project", "update", "alpha/app", "--quota", "none")
    assert "quota:      none" in appliance.ctl("project", "show", "alpha/app").stdout


def test_a_bad_quota_is_one_sentence_and_changes_nothing(appliance):
    result = appliance.ctl("project", "update", "alpha/app", "--quota", "20 parsecs", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("appliance-ctl: '20 parsecs' is not a size")
    assert "quota:      none" in appliance.ctl("project", "show", "alpha/app").stdout


def test_metrics_and_events_are_not_served_through_nginx(appliance):
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    for path in ("/metrics", "/-/registry-events"):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(
                f"https://{appliance.registry_address}{path}", context=context, timeout=10
            )
        assert answer.value.code == 404


def test_events_without_the_secret_are_refused(appliance):
    request = urllib.request.Request(
        f"http://{appliance.config['auth']['internal_addr']}/-/registry-events",
        data=b'{"events": []}',
        headers={"Authorization": "Bearer guessed", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10)
    assert answer.value.code == 401


def test_the_events_secret_never_reaches_the_logs(appliance):
    secret = json.loads((appliance.root / "etc/appliance/appliance-secrets.json").read_text())[
        "registry_events_secret"
    ]
    for log in (appliance.root / "var/log/appliance").rglob("*"):
        if log.is_file():
            assert secret not in log.read_text(errors="replace"), log
