"""appliance-ctl as an admin runs it: the virtualenv's console script, in a subprocess.

Only commands that need no running supervisord are here; start/stop/status of real
services are tested with the whole appliance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance import pki, settings

CTL = Path(sys.prefix) / "bin/appliance-ctl"


def ctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"}
    environment.update(env or {})
    result = subprocess.run(
        [str(CTL), *args], capture_output=True, text=True, timeout=60, env=environment
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def config(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    path = tmp_path / "appliance.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "root": str(root),
                "external_url": "https://registry.appliance.test",
                "initial_root_password": "correct-horse-battery",
                "registry": {
                    "internal_key": pki.generate_private_key("ec-p256").decode(),
                    "storage": {
                        "s3": {
                            "bucket": "images",
                            "region": "eu-west-1",
                            "accesskey": "AKIAEXAMPLE",
                            "secretkey": "s3-secret-value",
                        }
                    },
                },
            }
        )
    )
    return path


def test_show_config_prints_effective_settings_with_secrets_masked(config: Path) -> None:
    result = ctl("-c", str(config), "show-config")
    assert result.returncode == 0, result.stderr
    for secret in ("correct-horse-battery", "s3-secret-value", "PRIVATE KEY"):
        assert secret not in result.stdout
    shown = yaml.safe_load(result.stdout)
    root = config.parent / "root"
    assert shown["initial_root_password"] == "********"
    assert shown["registry"]["internal_key"] == "********"
    assert shown["registry"]["storage"]["s3"]["secretkey"] == "********"
    assert shown["registry"]["storage"]["s3"]["bucket"] == "images"
    # Defaults and derived values are there too.
    assert shown["registry"]["http_addr"] == "127.0.0.1:5000"
    assert shown["registry_external_url"] == "https://registry.appliance.test:5050"
    assert (
        shown["registry_nginx"]["ssl_certificate"]
        == f"{root}/etc/appliance/ssl/registry.appliance.test.crt"
    )
    assert shown["paths"]["config_file"] == str(config)
    assert shown["letsencrypt"]["enable"] is False
    assert not root.exists()  # showing changes nothing


def test_config_from_environment(config: Path) -> None:
    result = ctl("show-config", env={"APPLIANCE_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["root"] == str(config.parent / "root")


def test_example_config_needs_no_config(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("registry: [\n")
    result = ctl("example-config", env={"APPLIANCE_CONFIG": str(broken)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == settings.example_config()
    assert result.stdout.startswith("# appliance.yml")


@pytest.mark.parametrize("how", ["-c", "APPLIANCE_CONFIG"])
def test_a_named_config_that_is_missing(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "missing.yml"
    if how == "-c":
        result = ctl("-c", str(missing), "show-config")
    else:
        result = ctl("show-config", env={"APPLIANCE_CONFIG": str(missing)})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"appliance-ctl: {missing}: no such file; create it "
        f"(appliance-ctl example-config prints a commented one) or leave "
        f"out -c.\n"
    )


def test_a_bad_config_lists_every_problem_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/appliance").mkdir(parents=True)
    config = root / "etc/appliance/appliance.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "root": str(root),
                "registy": {},
                "registry": {
                    "http_addr": "localhost:99999",
                    "storage": {"s3": {"accesskey": "AKIA"}},
                },
                "nginx": {"http_port": 0},
            },
            sort_keys=False,
        )
    )
    before = sorted(p.name for p in root.rglob("*"))
    result = ctl("-c", str(config), "reconfigure")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"appliance-ctl: {config}: 5 problems found; nothing was changed.",
        "  - registy: unknown key; did you mean registry?",
        '  - registry.http_addr: "localhost:99999" is not host:port with a port 1-65535',
        "  - nginx.http_port: 0 is not a port number 1-65535",
        "  - registry.storage.s3.bucket: required by the s3 driver",
        "  - registry.storage.s3.region: required by the s3 driver",
    ]
    assert sorted(p.name for p in root.rglob("*")) == before


def test_invalid_yaml_says_where(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yml"
    config.write_text("registry:\n  enable: true\n  enable: false\n")
    result = ctl("-c", str(config), "show-config")
    assert result.returncode == 2
    assert result.stderr == (
        f"appliance-ctl: {config}: not valid YAML at line 3, column 3: the "
        f"key 'enable' appears twice in one mapping.\n"
    )


@pytest.mark.parametrize("command", [["status", "registy"], ["restart", "postgres"]])
def test_an_unknown_service_lists_the_services(config: Path, command: list[str]) -> None:
    result = ctl("-c", str(config), *command)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"appliance-ctl: unknown service {command[1]!r}; services are: "
        f"nginx, registry, auth, renewer, janitor.\n"
    )
    assert not (config.parent / "root").exists()


def test_no_command_is_a_usage_error() -> None:
    result = ctl()
    assert result.returncode == 2
    assert "usage: appliance-ctl" in result.stderr
