"""No secret reaches reconfigure's output, its dry run, its run log or show-config.

A real appliance under a temporary root, its settings filled with secrets in every
place the sensitivity rule covers (storage keys of each driver, registry.env,
notification headers, the root password, the token-signing key) plus the generated
ones in appliance-secrets.json. Masking is the engine's and the run log's rule, so it
holds for every resource: the supervisor program's environment= as much as the
registry config.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from appliance import pki
from tests.support.appliance import ApplianceUnderTest, free_port


def secrets_config(tag: str, storage: dict | None = None) -> tuple[dict, list[str]]:
    """Settings with a secret in every sensitive place, and those secrets."""
    key = pki.generate_private_key("ec-p256").decode()
    values = {
        name: f"{name}-{tag}-value"
        for name in (
            "s3-secretkey",
            "s3-sessiontoken",
            "env-secret",
            "env-password",
            "hook-token",
            "hook-api-key",
            "root-password",
        )
    }
    config = {
        "initial_root_password": values["root-password"],
        "registry": {
            "internal_key": key,
            "storage": storage
            or {
                "s3": {
                    "bucket": "registry",
                    "region": "us-east-1",
                    "accesskey": "AKIAEXAMPLE",
                    "secretkey": values["s3-secretkey"],
                    "sessiontoken": values["s3-sessiontoken"],
                    # nothing listens there: the registry starts without reaching its bucket
                    "regionendpoint": f"http://127.0.0.1:{free_port()}",
                }
            },
            "env": {
                "REGISTRY_STORAGE_S3_SECRETKEY": values["env-secret"],
                "REGISTRY_X_PASSWORD": values["env-password"],
                "GOGC": 400,
            },
            "notifications": [
                {
                    "name": "hook",
                    "url": "http://127.0.0.1:9/",
                    "headers": {
                        "Authorization": [f"Bearer {values['hook-token']}"],
                        "X-Api-Key": [values["hook-api-key"]],
                    },
                }
            ],
        },
    }
    body = [line for line in key.splitlines()[1:-1]]
    return config, [*values.values(), *body]


def generated_secrets(appliance: ApplianceUnderTest) -> list[str]:
    stored = json.loads((appliance.root / "etc/appliance/appliance-secrets.json").read_text())
    return [
        stored["registry_http_secret"],
        stored["auth_secret"],
        *stored["letsencrypt_account_key"].splitlines()[1:-1],
    ]


def assert_no_secret(result: subprocess.CompletedProcess | str, secrets: list[str]) -> None:
    text = result if isinstance(result, str) else result.stdout + result.stderr
    leaked = [secret for secret in secrets if secret in text]
    assert not leaked, f"printed: {leaked}"


@pytest.fixture
def appliance():
    config, _ = secrets_config("first")
    appliance = ApplianceUnderTest.create(config, prefix="appliance-masking-")
    try:
        yield appliance
    finally:
        appliance.destroy()


def test_no_secret_in_reconfigure_dry_run_run_log_or_show_config(appliance):
    config, first = secrets_config("first")
    appliance.write_config(config)
    dry = appliance.reconfigure("--dry-run")
    assert "secretkey: ********" in dry.stdout  # the diff is shown, its secret masked
    assert_no_secret(dry, first)

    run = appliance.reconfigure()
    # registry.env reaches the registry through its wrapper's program.json, a sensitive
    # file: reported, its content never printed.
    assert "program.json (created)" in run.stdout
    assert 'secret: "********"' in run.stdout  # http.secret, generated
    generated = generated_secrets(appliance)
    assert_no_secret(run, first + generated)

    # New values everywhere: each diff now holds an old and a new secret.
    config, second = secrets_config("second")
    appliance.write_config(config)
    assert_no_secret(appliance.reconfigure("--dry-run"), first + second + generated)
    changed = appliance.reconfigure()
    assert "-        - ********" in changed.stdout
    assert "+        - ********" in changed.stdout
    assert_no_secret(changed, first + second + generated)

    # The other drivers' keys, as a dry run renders them over the s3 config.
    for driver, params, secret in (
        ("azure", {"accountname": "acct", "container": "c"}, "accountkey"),
        (
            "swift",
            {"username": "u", "authurl": "https://keystone.example.com/v3", "container": "c"},
            "password",
        ),
        ("oss", {"accesskeyid": "id", "region": "r", "bucket": "b"}, "accesskeysecret"),
    ):
        value = f"{driver}-{secret}-value"
        appliance.config["registry"]["storage"] = {driver: {**params, secret: value}}
        appliance.write_config()
        dry = appliance.reconfigure("--dry-run")
        assert f"+    {secret}: ********" in dry.stdout
        assert_no_secret(dry, [value, *second, *generated])

    logs = sorted((appliance.root / "var/log/appliance/reconfigure").glob("*.log"))
    assert len(logs) == 2  # the two real runs; a dry run keeps none
    for log in logs:
        text = log.read_text()
        assert "secretkey: ********" in text
        assert_no_secret(text, first + second + generated)

    assert_no_secret(appliance.ctl("show-config"), first + second + generated)
