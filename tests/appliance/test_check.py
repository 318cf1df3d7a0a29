"""`appliance-ctl check` and `appliance-ctl why` against a whole running appliance.

One appliance for the module: healthy first, then each failure the issue names is
provoked the way it happens on a host (a bundle that is not the signing key's, an
expired certificate nginx serves, a storage directory the registry's account cannot
write, a service stopped), checked, and put back; the next test starts from a healthy
appliance again. The S3 probe runs against moto's real S3 server. `why` is asked about
a user whose token requests went through nginx, so its audit line is the service's own.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import sqlite3
import ssl
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance import pki
from appliance.auth.migrations import MIGRATIONS
from appliance.check import FAIL, OK, SKIP, probe_s3
from appliance.registry_storage import S3Storage
from tests.support.appliance import ApplianceUnderTest
from tests.support.s3 import s3_client

PASSWORD = "a long password for bob"


@pytest.fixture(scope="module")
def appliance() -> Iterator[ApplianceUnderTest]:
    # The guide's blob descriptor cache: the probe's repository, removed from storage
    # after each run, must push again at the next one (a stale cache entry would not).
    appliance = ApplianceUnderTest.create(
        {"registry": {"storage": {"cache": {"blobdescriptor": "inmemory"}}}}, prefix="check-"
    )
    try:
        appliance.reconfigure()
        yield appliance
    finally:
        appliance.destroy()


def run_check(appliance: ApplianceUnderTest) -> tuple[int, dict[str, dict], str]:
    """Exit status, the results by check name (from --json), and the text output."""
    text = appliance.ctl("check", check=False)
    document = json.loads(appliance.ctl("check", "--json", check=False).stdout)
    results = {r["check"]: r for r in document["checks"]}
    assert document["ok"] == (text.returncode == 0)
    return text.returncode, results, text.stdout


def failed(results: dict[str, dict]) -> dict[str, dict]:
    return {name: r for name, r in results.items() if r["status"] == FAIL}


def storage_root(appliance: ApplianceUnderTest) -> Path:
    return appliance.root / "var/opt/appliance/registry/data"


def test_a_healthy_appliance_passes_every_check(appliance) -> None:
    status, results, text = run_check(appliance)
    assert status == 0, text
    assert {r["status"] for r in results.values()} <= {OK, SKIP}, text
    for name in (
        "service nginx",
        "service registry",
        "service auth",
        "name localhost",
        "certificate",
        "certificate served",
        "signing key",
        "storage",
        "token round trip",
        "push and pull",
        "disk storage",
        "disk logs",
        "auth database",
    ):
        assert results[name]["status"] == OK, text
    assert f"schema {len(MIGRATIONS)}, current" in results["auth database"]["message"]
    assert "janitor" not in results  # janitor.enable is false by default
    ports = [name for name in results if name.startswith("port ")]
    assert len(ports) == 2  # nginx.http_port and registry_nginx.listen_port
    # Nothing external is reachable here: the clock is skipped with a note, quickly.
    assert results["clock"]["status"] in (SKIP, OK)
    # The last line counts the results and says how long the checks took (bench/check
    # measures it; a timed test would only measure the machine's other load).
    assert re.search(r"^check: (16 ok, 1 skip|17 ok) in \d+\.\d\d s$", text, re.M), text
    # The probe repository is gone: no directory of it, nothing in the catalog.
    repositories = storage_root(appliance) / "docker/registry/v2/repositories"
    assert not (repositories / "appliance--check").exists()
    catalog = fetch(appliance, "/v2/_catalog", appliance.token("registry:catalog:*"))
    assert "appliance--check/probe" not in json.loads(catalog)["repositories"]


def fetch(appliance: ApplianceUnderTest, path: str, token: str) -> bytes:
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    request = urllib.request.Request(
        f"https://{appliance.registry_address}{path}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        return reply.read()


@contextmanager
def replaced(path: Path, content: bytes) -> Iterator[None]:
    original, mode = path.read_bytes(), path.stat().st_mode
    stat = path.stat()
    path.write_bytes(content)
    try:
        yield
    finally:
        path.write_bytes(original)
        os.chmod(path, mode)
        os.chown(path, stat.st_uid, stat.st_gid)


def test_a_bundle_without_the_signing_key_fails(appliance) -> None:
    other_key = pki.generate_private_key()
    other = pki.signing_certificate(other_key, "someone else")
    bundle = appliance.root / "var/opt/appliance/registry/token-bundle.crt"
    with replaced(bundle, other):
        status, results, text = run_check(appliance)
        assert status == 1
        signing = results["signing key"]
        assert signing["status"] == FAIL
        assert "matches the token-signing key" in signing["message"]
        assert "signed by untrusted key" in signing["message"]
        assert "appliance-ctl reconfigure" in signing["fix"]
        assert results["token round trip"]["status"] == FAIL
        assert "names no certificate of" in results["token round trip"]["message"]
        assert re.search(r"^FAIL  signing key: .* Fix: appliance-ctl reconfigure", text, re.M)
    assert run_check(appliance)[0] == 0


def test_an_expired_certificate_fails(appliance) -> None:
    key_path = appliance.certificate.with_suffix(".key")
    key = pki.generate_private_key()
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = pki.self_signed_certificate(key, ["localhost"], days=2, now=long_ago)
    with replaced(key_path, key), replaced(appliance.certificate, expired):
        appliance.ctl("hup", "nginx")
        status, results, text = run_check(appliance)
        assert status == 1, text
        certificate = results["certificate"]
        assert certificate["status"] == FAIL
        assert "expired on" in certificate["message"]
        assert certificate["fix"].startswith("appliance-ctl renew-certs --force")
        assert results["certificate served"]["status"] == OK  # nginx serves that very file
        assert set(failed(results)) == {"certificate"}, text
    appliance.ctl("hup", "nginx")
    assert run_check(appliance)[0] == 0


def test_unwritable_storage_fails(appliance) -> None:
    root = storage_root(appliance)
    mode = root.stat().st_mode
    os.chmod(root, 0o550)  # the registry's account owns it and may no longer write
    try:
        status, results, text = run_check(appliance)
        assert status == 1, text
        storage = results["storage"]
        assert storage["status"] == FAIL
        assert "cannot write, read and delete under" in storage["message"]
        assert "Permission denied" in storage["message"]
        assert "appliance-ctl reconfigure" in storage["fix"]
    finally:
        os.chmod(root, mode)
    assert run_check(appliance)[0] == 0


def set_schema_version(database: Path, version: int) -> None:
    connection = sqlite3.connect(database)
    try:
        connection.execute(f"PRAGMA user_version = {version:d}")
    finally:
        connection.close()


def test_an_auth_database_behind_this_version_fails_with_reconfigure_as_the_fix(
    appliance,
) -> None:
    # What a host sees when a package upgrade ran without its reconfigure (or a restore
    # brought back an older database): the service would refuse to start on it.
    database = appliance.root / "var/opt/appliance/auth/auth.db"
    current = len(MIGRATIONS)
    set_schema_version(database, current - 1)
    try:
        status, results, text = run_check(appliance)
        assert status == 1, text
        line = results["auth database"]
        assert line["status"] == FAIL
        assert (
            f"SQLite {database} has schema {current - 1}, this version needs {current}"
            in (line["message"])
        )
        assert line["fix"] == "run appliance-ctl reconfigure (it migrates the schema)."
    finally:
        set_schema_version(database, current)
    assert run_check(appliance)[0] == 0


def test_a_stopped_service_fails_with_the_command_that_starts_it(appliance) -> None:
    appliance.ctl("stop", "auth")
    try:
        status, results, text = run_check(appliance)
        assert status == 1, text
        auth = results["service auth"]
        assert auth["status"] == FAIL
        assert "stopped with appliance-ctl stop" in auth["message"]
        assert auth["fix"] == "appliance-ctl start auth."
        assert results["token round trip"]["status"] == FAIL
        assert results["service registry"]["status"] == OK
    finally:
        appliance.ctl("start", "auth")
    appliance.wait_listening()
    assert run_check(appliance)[0] == 0


def test_the_s3_probe_heads_puts_and_deletes_with_the_registrys_credentials(
    s3_server,
) -> None:
    parameters = {
        "accesskey": "testing",
        "secretkey": "testing",
        "bucket": "probe-bucket",
        "region": "us-east-1",
        "regionendpoint": s3_server,
        "rootdirectory": "/images",
    }
    missing = probe_s3(S3Storage(parameters))
    assert missing.status == FAIL
    assert "HEAD the bucket refused: 404" in missing.message
    assert missing.fix == "create the bucket probe-bucket or correct registry.storage.s3.bucket."
    s3_client(s3_server).create_bucket(Bucket="probe-bucket")
    found = probe_s3(S3Storage(parameters))
    assert found.status == OK, found
    assert found.message == (
        "s3 bucket probe-bucket under /images: HEAD, PUT, HEAD, DELETE answered."
    )
    listed = s3_client(s3_server).list_objects_v2(Bucket="probe-bucket")
    assert listed.get("KeyCount", 0) == 0  # the probe object is gone again


def token_request(appliance: ApplianceUnderTest, user: str, password: str, scope: str) -> dict:
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"https://{appliance.registry_address}/jwt/auth?service=container_registry&scope={scope}",
        headers={"Authorization": f"Basic {credentials}"},
    )
    context = ssl.create_default_context(cafile=str(appliance.certificate))
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        return json.load(reply)


def test_why_explains_a_refusal_and_a_grant_with_the_audit_line(appliance) -> None:
    appliance.ctl("user", "create", "bob", "--password-stdin", input=PASSWORD + "\n")
    appliance.ctl("project", "create", "team/app")
    appliance.ctl("member", "add", "team/app", "bob", "reporter")
    token_request(appliance, "bob", PASSWORD, "repository:team/app:pull,push")

    refused = appliance.ctl("why", "bob", "push", "team/app", check=False)
    assert refused.returncode == 3, refused.stderr
    lines = refused.stdout.splitlines()
    assert lines[0] == (
        "refused: bob may not push team/app: role reporter in project team/app allows only pull."
    )
    assert "  - project team/app owns team/app (private, registry enabled)" in lines
    assert "  fix: appliance-ctl member add team/app bob developer" in lines
    assert any(
        line.startswith("last audit line for this user and repository, ")
        and "partial (HTTP 200): repository:team/app:pull,push: role reporter" in line
        for line in lines
    ), refused.stdout
    assert json.loads(lines[-1])["requested"] == ["repository:team/app:pull,push"]

    appliance.ctl("member", "add", "team/app", "bob", "developer")
    token_request(appliance, "bob", PASSWORD, "repository:team/app:pull,push")
    granted = appliance.ctl("why", "bob", "push", "team/app")
    assert granted.stdout.splitlines()[0] == "granted: bob may push team/app."
    assert json.loads(granted.stdout.splitlines()[-1])["result"] == "granted"

    created = appliance.ctl(
        "deploy-token", "create", "team/app", "--name", "cluster", "--scope", "read_registry"
    )
    name = re.search(r"username: (\S+)", created.stdout).group(1)
    deploy = appliance.ctl("why", name, "push", "team/app", check=False)
    assert deploy.returncode == 3
    assert deploy.stdout.startswith(
        f"refused: {name} may not push team/app: the deploy token's scopes allow only pull."
    )
    assert f"no audit line for {name} on team/app" in deploy.stdout

    unknown = appliance.ctl("why", "nobody", "pull", "team/app", check=False)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("appliance-ctl: There is no user named 'nobody'")


def test_with_supervisord_down_every_failure_is_a_sentence_with_its_fix(appliance) -> None:
    """The last test of the module: it stops everything, then brings it back."""
    appliance.ctl("shutdown")
    try:
        result = appliance.ctl("check", check=False)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr and result.stderr == ""
        lines = result.stdout.splitlines()
        assert lines[0] == (
            "FAIL  services: supervisord is not running, so no service is. Fix: "
            "appliance-ctl reconfigure starts it (on a host: systemctl start appliance-runsvdir)."
        )
        fails = [line for line in lines if line.startswith("FAIL")]
        assert {"FAIL  token round trip", "FAIL  push and pull", "FAIL  certificate served"} <= {
            line.split(":")[0] for line in fails
        }, result.stdout
        assert all(" Fix: " in line for line in fails), result.stdout
    finally:
        appliance.reconfigure()
    assert run_check(appliance)[0] == 0
