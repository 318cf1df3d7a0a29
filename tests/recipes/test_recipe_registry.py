"""The registry recipe: what each setting renders, and which service each file notifies.

Pure: settings in, resources out, the config parsed back as the registry would parse
it. Processes are the whole-appliance tests' business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from appliance.engine import Engine, Redactor
from appliance.errors import ConfigError
from appliance.resources import Absent, Directory, reload
from appliance.secrets import Secrets
from appliance.settings import sensitive_values
from recipes import registry, supervisor
from tests.support.recipes import settings_for

SECRETS = Secrets(
    token_signing_key="KEY",
    token_signing_certificate="-----BEGIN CERTIFICATE-----\nTOKEN\n-----END CERTIFICATE-----\n",
    registry_http_secret="http-secret-0123456789",
    auth_secret="auth-secret",
    letsencrypt_account_key="ACCOUNT",
    registry_events_secret="events-secret-0123456789",
)


def by_path(resources: list, path: Path):
    matches = [r for r in resources if getattr(r, "path", None) == path]
    assert matches, f"no resource for {path}"
    return matches[0]


def rendered_config(root: Path, **overrides: object) -> dict:
    settings = settings_for(root, **overrides)
    resource = by_path(registry.resources(settings, SECRETS), settings.paths.registry_config)
    return yaml.safe_load(resource.content)


def program_file(root: Path, **overrides: object) -> dict[str, str]:
    """The registry's [program:registry] section as supervisord reads it."""
    import configparser

    settings = settings_for(root, **overrides)
    resource = by_path(
        registry.resources(settings, SECRETS), supervisor.programs_dir(settings) / "registry.conf"
    )
    parser = configparser.RawConfigParser()
    parser.read_string(resource.content.decode())
    return dict(parser["program:registry"])


def test_default_config_is_token_auth_on_filesystem_storage(tmp_path):
    config = rendered_config(tmp_path)
    data = tmp_path / "var/opt/appliance/registry/data"
    assert config["storage"] == {
        "filesystem": {"rootdirectory": str(data)},
        "delete": {"enabled": True},
    }
    assert config["http"]["addr"] == "127.0.0.1:5000"
    assert config["http"]["secret"] == SECRETS.registry_http_secret
    assert "debug" not in config["http"]
    assert config["auth"] == {
        "token": {
            "realm": "https://localhost:5050/jwt/auth",
            "service": "container_registry",
            "issuer": "appliance-issuer",
            "rootcertbundle": str(tmp_path / "var/opt/appliance/registry/token-bundle.crt"),
        }
    }
    # Only the appliance's own endpoints (the auth service's history and usage).
    assert [e["name"] for e in config["notifications"]["endpoints"]] == [
        "appliance-events",
        "appliance-pulls",
    ]
    assert config["health"]["storagedriver"]["enabled"] is True
    assert config["compatibility"] == {"schema1": {"enabled": False}}
    assert config["log"]["level"] == "info"


def test_token_realm_follows_the_registry_url(tmp_path):
    config = rendered_config(tmp_path, registry_external_url="https://registry.example.com")
    assert config["auth"]["token"]["realm"] == "https://registry.example.com/jwt/auth"


def test_issuer_and_service_come_from_settings(tmp_path):
    config = rendered_config(tmp_path, registry={"issuer": "my-issuer", "service": "my-svc"})
    assert config["auth"]["token"]["issuer"] == "my-issuer"
    assert config["auth"]["token"]["service"] == "my-svc"


def test_storage_path_setting(tmp_path):
    config = rendered_config(tmp_path, registry={"storage_path": "/srv/registry"})
    assert config["storage"]["filesystem"] == {"rootdirectory": "/srv/registry"}
    settings = settings_for(tmp_path, registry={"storage_path": "/srv/registry"})
    directories = [r for r in registry.resources(settings, SECRETS) if isinstance(r, Directory)]
    assert Path("/srv/registry") in [d.path for d in directories]


def test_s3_driver_is_rendered_verbatim_and_needs_no_data_directory(tmp_path):
    s3 = {
        "accesskey": "AKIA",
        "secretkey": "s3cr3t: #not a comment",
        "bucket": "images",
        "region": "us-east-1",
        "regionendpoint": "http://127.0.0.1:9000",
        "chunksize": 25000000,
        "secure": False,
        "v4auth": True,
    }
    storage = {"s3": s3, "redirect": {"disable": True}, "cache": {"blobdescriptor": "inmemory"}}
    config = rendered_config(tmp_path, registry={"storage": storage})
    assert config["storage"] == {
        "s3": s3,
        "delete": {"enabled": True},
        "redirect": {"disable": True},
        "cache": {"blobdescriptor": "inmemory"},
    }
    settings = settings_for(tmp_path, registry={"storage": storage})
    paths = [r.path for r in registry.resources(settings, SECRETS) if isinstance(r, Directory)]
    assert settings.paths.registry_dir / "data" not in paths


@pytest.mark.parametrize(
    "driver, params",
    [
        ("azure", {"accountname": "acct", "accountkey": "a2V5", "container": "registry"}),
        ("gcs", {"bucket": "images", "keyfile": "/etc/appliance/gcs.json", "chunksize": 5242880}),
        (
            "swift",
            {
                "username": "u",
                "password": "p",
                "authurl": "https://keystone.example.com/v3",
                "container": "registry",
            },
        ),
        (
            "oss",
            {
                "accesskeyid": "id",
                "accesskeysecret": "secret",
                "region": "oss-cn-beijing",
                "bucket": "images",
            },
        ),
    ],
)
def test_other_storage_drivers_are_rendered_verbatim(tmp_path, driver, params):
    config = rendered_config(tmp_path, registry={"storage": {driver: params}})
    assert config["storage"] == {driver: params, "delete": {"enabled": True}}


def test_delete_can_be_disabled(tmp_path):
    config = rendered_config(tmp_path, registry={"storage_delete_enabled": False})
    assert config["storage"]["delete"] == {"enabled": False}


def test_debug_server_turns_prometheus_on(tmp_path):
    config = rendered_config(tmp_path, registry={"debug_addr": "127.0.0.1:5001"})
    assert config["http"]["debug"] == {
        "addr": "127.0.0.1:5001",
        "prometheus": {"enabled": True, "path": "/metrics"},
    }


def test_notifications_are_rendered_with_the_guides_defaults(tmp_path):
    endpoints = [
        {
            "name": "listener",
            "url": "https://hooks.example.com/event",
            "headers": {"Authorization": ["Bearer TOKEN"]},
            "timeout": "2s",
            "threshold": 3,
            "backoff": "5s",
        },
        {"name": "minimal", "url": "http://127.0.0.1:9999/"},
    ]
    config = rendered_config(tmp_path, registry={"notifications": endpoints})
    assert config["notifications"]["endpoints"][:2] == [
        endpoints[0],
        {
            "name": "minimal",
            "url": "http://127.0.0.1:9999/",
            "headers": {},
            "timeout": "500ms",
            "threshold": 5,
            "backoff": "1s",
        },
    ]


def test_the_auth_service_gets_pushes_deletes_mounts_and_manifest_pulls(tmp_path):
    """Two endpoints to the auth service's internal listener, after the admin's: every
    push, delete and mount (blobs too: the usage figures), and manifest pulls only (a
    blob pull reaches neither: 2.8 gives every blob event application/octet-stream).
    2.8 applies `ignore` only to an endpoint that ignores some media type."""
    admin = {"name": "listener", "url": "https://hooks.example.com/event"}
    config = rendered_config(
        tmp_path, registry={"notifications": [admin]}, auth={"internal_addr": "127.0.0.1:6101"}
    )
    endpoints = config["notifications"]["endpoints"]
    assert [e["name"] for e in endpoints] == ["listener", "appliance-events", "appliance-pulls"]
    events, pulls = endpoints[1:]
    for endpoint in (events, pulls):
        assert endpoint["url"] == "http://127.0.0.1:6101/-/registry-events"
        assert endpoint["headers"] == {"Authorization": ["Bearer events-secret-0123456789"]}
    assert events["ignore"] == {"actions": ["pull"]}
    assert events["ignoredmediatypes"] == [registry.NO_MEDIA_TYPE]
    assert pulls["ignore"] == {
        "mediatypes": ["application/octet-stream"],
        "actions": ["push", "delete", "mount"],
    }
    assert "events-secret-0123456789" in program_json(tmp_path)["secrets"]
    settings = settings_for(tmp_path)
    resource = by_path(registry.resources(settings, SECRETS), settings.paths.registry_config)
    assert "events-secret-0123456789" not in printed_diff(settings, resource)


def test_an_admin_endpoint_may_not_take_the_appliances_name(tmp_path):
    with pytest.raises(ConfigError) as refused:
        rendered_config(
            tmp_path, registry={"notifications": [{"name": "appliance-pulls", "url": "http://x/"}]}
        )
    assert refused.value.problems == [
        'registry.notifications[0].name: "appliance-pulls" is the appliance\'s own; '
        "choose another name"
    ]


def test_without_the_auth_service_no_endpoint_is_added(tmp_path):
    config = rendered_config(tmp_path, auth={"enable": False})
    assert "notifications" not in config


def test_schema1_compatibility(tmp_path):
    config = rendered_config(tmp_path, registry={"compatibility_schema1_enabled": True})
    assert config["compatibility"] == {"schema1": {"enabled": True}}


def test_health_check_of_storage_can_be_turned_off(tmp_path):
    config = rendered_config(tmp_path, registry={"health_storagedriver_enabled": False})
    assert config["health"]["storagedriver"]["enabled"] is False


def test_http_addr_is_where_the_registry_listens(tmp_path):
    config = rendered_config(tmp_path, registry={"http_addr": "127.0.0.1:6000"})
    assert config["http"]["addr"] == "127.0.0.1:6000"


def test_on_a_unix_socket_the_registry_listens_there_under_umask_007():
    root = Path("/srv/appliance")  # pytest's tmp_path is too long for a socket path
    config = rendered_config(root, registry={"listen_network": "unix"})
    assert config["http"]["net"] == "unix"
    assert (
        config["http"]["addr"] == "/srv/appliance/var/opt/appliance/registry-socket/registry.sock"
    )
    assert program_file(root, registry={"listen_network": "unix"})["umask"] == "007"
    assert "umask" not in program_file(root)
    assert "net" not in rendered_config(root)["http"]


def program_json(root: Path, **overrides: object) -> dict:
    """program.json, what the registry's wrapper reads (appliance/programs/registry.py)."""
    settings = settings_for(root, **overrides)
    resource = by_path(
        registry.resources(settings, SECRETS), settings.paths.registry_dir / "program.json"
    )
    return json.loads(resource.content)


def test_env_reaches_the_program_exactly_as_given(tmp_path):
    env = {
        "REGISTRY_HTTP_RELATIVEURLS": True,
        "REGISTRY_LOG_FIELDS_SITE": "a,b=c 100%",
        "REGISTRY_QUOTED": 'say "hi" now',
        "REGISTRY_NUMBER": 3,
    }
    # The wrapper passes it to the registry: the supervisord program file carries no
    # environment, so an env change is a handover, not a restart of the program.
    assert "environment" not in program_file(tmp_path, registry={"env": env})
    assert program_json(tmp_path, registry={"env": env})["environment"] == {
        "REGISTRY_HTTP_RELATIVEURLS": "true",
        "REGISTRY_LOG_FIELDS_SITE": "a,b=c 100%",
        "REGISTRY_QUOTED": 'say "hi" now',
        "REGISTRY_NUMBER": "3",
        "GOGC": registry.GOGC,
    }


def test_gogc_in_registry_env_replaces_the_default(tmp_path):
    environment = program_json(tmp_path, registry={"env": {"GOGC": 100}})["environment"]
    assert environment == {"GOGC": "100"}


def test_wrapper_masks_every_configured_secret_in_the_log(tmp_path):
    storage = {
        "s3": {"bucket": "b", "region": "r", "accesskey": "AKIA", "secretkey": "very-secret-key"}
    }
    notifications = [
        {
            "name": "n",
            "url": "http://127.0.0.1:1/",
            "headers": {"Authorization": ["Bearer hook-token"]},
        }
    ]
    env = {"REGISTRY_STORAGE_S3_SESSIONTOKEN": "session-token-value", "REGISTRY_X": "plain"}
    secrets = program_json(
        tmp_path, registry={"storage": storage, "env": env, "notifications": notifications}
    )["secrets"]
    for secret in (
        "very-secret-key",
        "Bearer hook-token",
        "session-token-value",
        SECRETS.registry_http_secret,
    ):
        assert secret in secrets
    assert "plain" not in secrets and "b" not in secrets


def test_env_value_supervisord_cannot_carry_is_refused(tmp_path):
    # Refused with the rest of appliance.yml, before any resource is built.
    with pytest.raises(ConfigError) as refused:
        program_file(tmp_path, registry={"env": {"REGISTRY_X": """both ' and " """}})
    assert any(p.startswith("registry.env.REGISTRY_X:") for p in refused.value.problems)


def test_program_runs_the_registry_on_its_config(tmp_path):
    program = program_file(tmp_path)
    config = tmp_path / "var/opt/appliance/registry/config.yml"
    wrapper = program_json(tmp_path)
    assert wrapper["command"] == ["/usr/bin/docker-registry", "serve", str(config)]
    assert wrapper["primary"] == "127.0.0.1:5000"
    deep = tmp_path / ("deep" * 20)  # too deep for a socket path (107 bytes)
    assert program_json(deep, auth={"listen_network": "tcp"})["standby"] is None
    assert (
        program_json(Path("/srv/appliance"))["standby"]
        == "/srv/appliance/var/opt/appliance/registry-socket/standby.sock"
    )
    assert program["command"].split(" -- ", 1)[1] == (
        f"{supervisor.executable('python')} -m appliance.programs.registry "
        f"{tmp_path / 'var/opt/appliance/registry/program.json'}"
    )
    assert (
        program["command"]
        .split(" -- ", 1)[0]
        .endswith(
            "/appliance/launcher.py "
            f"{tmp_path}/var/opt/appliance/"
            "supervisor/supervisord.conf registry"
        )
    )
    assert program["stdout_logfile"] == str(tmp_path / "var/log/appliance/registry/current")
    assert "user" not in program  # an ordinary user runs everything as itself


def test_as_root_the_registry_runs_as_its_own_account(tmp_path):
    settings = settings_for(tmp_path, run_as_root=True)
    resources = registry.resources(settings, SECRETS)
    program = by_path(resources, supervisor.programs_dir(settings) / "registry.conf")
    assert "user = appliance-registry" in program.content.decode()
    config = by_path(resources, settings.paths.registry_config)
    assert (config.mode, config.owner, config.group) == (0o640, None, "appliance-registry")
    data = by_path(resources, settings.paths.registry_dir / "data")
    assert (data.owner, data.mode) == ("appliance-registry", 0o750)


def test_config_bundle_and_environment_hand_the_registry_over(tmp_path):
    settings = settings_for(tmp_path)
    resources = registry.resources(settings, SECRETS)
    config = by_path(resources, settings.paths.registry_config)
    bundle = by_path(resources, settings.paths.token_bundle)
    program = by_path(resources, settings.paths.registry_dir / "program.json")
    assert config.notifies == (reload("registry"),)
    assert bundle.notifies == (reload("registry"),)
    assert program.notifies == (reload("registry"),)
    assert program.sensitive and program.mode == 0o640
    assert bundle.content == SECRETS.token_signing_certificate.encode()


def printed_diff(settings, resource) -> str:
    """What reconfigure --dry-run prints for `resource` over an old "old\\n" file: the
    engine, fed the run's secrets, masks them whatever resource carries them."""
    resource.path.parent.mkdir(parents=True, exist_ok=True)
    resource.path.write_text("old\n")
    lines: list[str] = []
    redact = Redactor([*sensitive_values(settings), *SECRETS.private_values()])
    Engine(lines.append, dry_run=True, redact=redact).converge([resource])
    return "".join(line + "\n" for line in lines)


def test_config_diff_masks_every_secret(tmp_path):
    storage = {
        "s3": {"bucket": "b", "region": "r", "accesskey": "AKIA", "secretkey": "very-secret-key"}
    }
    notifications = [
        {
            "name": "n",
            "url": "http://127.0.0.1:1/",
            "headers": {"Authorization": ["Bearer hook-token"]},
        }
    ]
    settings = settings_for(tmp_path, registry={"storage": storage, "notifications": notifications})
    config = by_path(registry.resources(settings, SECRETS), settings.paths.registry_config)
    diff = printed_diff(settings, config)
    assert "bucket: b" in diff
    for secret in ("very-secret-key", "hook-token", SECRETS.registry_http_secret):
        assert secret.encode() in config.content
        assert secret not in diff


def test_disabled_registry_only_removes_its_program(tmp_path):
    settings = settings_for(tmp_path, registry={"enable": False})
    resources = registry.resources(settings, SECRETS)
    assert resources == [Absent(supervisor.programs_dir(settings) / "registry.conf")]


def test_short_secret_is_masked_as_a_value_only(tmp_path):
    notifications = [{"name": "n", "url": "http://127.0.0.1:1/", "headers": {"X-Key": ["1"]}}]
    settings = settings_for(
        tmp_path, registry={"notifications": notifications, "http_addr": "127.0.0.1:5111"}
    )
    config = by_path(registry.resources(settings, SECRETS), settings.paths.registry_config)
    diff = printed_diff(settings, config)
    assert "+        - ********\n" in diff
    assert "127.0.0.1:5111" in diff  # its 1s are not secrets


def test_filesystem_driver_given_as_a_hash_gets_its_directory(tmp_path):
    storage = {"filesystem": {"rootdirectory": "/srv/images", "maxthreads": 50}}
    config = rendered_config(tmp_path, registry={"storage": storage})
    assert config["storage"]["filesystem"] == {"rootdirectory": "/srv/images", "maxthreads": 50}
    settings = settings_for(tmp_path, run_as_root=True, registry={"storage": storage})
    data = by_path(registry.resources(settings, SECRETS), Path("/srv/images"))
    assert (data.owner, data.mode) == ("appliance-registry", 0o750)
    bare = rendered_config(tmp_path, registry={"storage": {"filesystem": {}}})
    assert bare["storage"]["filesystem"] == {
        "rootdirectory": str(tmp_path / "var/opt/appliance/registry/data")
    }


@pytest.mark.parametrize(
    ("debug_addr", "warned"),
    [
        (None, False),
        ("127.0.0.1:5001", False),
        ("localhost:5001", False),
        ("[::1]:5001", False),
        ("0.0.0.0:5001", True),
        ("[::]:5001", True),
        ("192.0.2.7:5001", True),
        ("monitor.example.com:5001", True),  # a name may resolve anywhere
    ],
)
def test_a_debug_server_off_loopback_is_warned_about(tmp_path, debug_addr, warned):
    settings = settings_for(tmp_path, registry={"debug_addr": debug_addr})
    lines = registry.messages(settings, None)
    assert bool(lines) == warned
    if warned:
        [line] = lines
        assert line.startswith(f"Warning: registry.debug_addr {debug_addr} is not a loopback")
        assert "/debug/pprof/" in line


def test_the_read_only_config_is_the_same_config_with_read_only_storage(tmp_path):
    maintenance = {"uploadpurging": {"enabled": False}}
    settings = settings_for(tmp_path, registry={"storage": {"maintenance": maintenance}})
    resources = registry.resources(settings, SECRETS)
    config = yaml.safe_load(by_path(resources, settings.paths.registry_config).content)
    readonly = by_path(resources, registry.readonly_config(settings))
    assert readonly.notifies == (reload("registry"),) and readonly.mode == 0o640
    expected = dict(config)
    expected["storage"] = {
        **config["storage"],
        "maintenance": {"uploadpurging": {"enabled": False}, "readonly": {"enabled": True}},
    }
    assert yaml.safe_load(readonly.content) == expected
    program = program_json(tmp_path)
    assert program["readonly_command"] == [
        *program["command"][:-1],
        str(registry.readonly_config(settings_for(tmp_path))),
    ]
    assert program["maintenance_file"] == str(settings.paths.registry_maintenance)


def test_a_maintenance_window_whose_owner_is_gone_is_removed_and_hands_the_registry_over(
    tmp_path,
):
    import subprocess

    from appliance import registry_maintenance as maintenance

    settings = settings_for(tmp_path)
    [stale] = [
        r
        for r in registry.resources(settings, SECRETS)
        if isinstance(r, registry.StaleMaintenanceWindow)
    ]
    assert stale.notifies == (reload("registry"),)
    assert stale.plan(stale.current()) == []  # no marker
    path = settings.paths.registry_maintenance
    path.parent.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid, changes in ((os.getpid(), 0), (gone.pid, 1)):  # a live owner's window stays
        maintenance.write(path, maintenance.Window("garbage collection", 1, 2, pid, None))
        assert len(stale.plan(stale.current())) == changes
    assert "left by pid" in stale.plan(stale.current())[0].summary
    stale.apply()
    assert not path.exists()
