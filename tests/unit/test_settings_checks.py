"""The cross-checks, one section at a time: (input) -> every problem it must produce.

Each check is a small function of the part of the settings it looks at, so its table
needs no file and no other section. test_settings.py checks the same rules through a
whole appliance.yml.
"""

from __future__ import annotations

from typing import Any

import pytest

from appliance import settings
from appliance.settings import (
    AuthSettings,
    LetsEncryptSettings,
    NginxSettings,
    RawSettings,
    RegistryNginxSettings,
    RegistrySettings,
)

S3 = {"bucket": "b", "region": "r"}
DRIVERS = "filesystem, s3, azure, gcs, swift, oss, inmemory"
URL = "http://127.0.0.1:1/"

STORAGE = {
    "empty: the filesystem default": ({}, []),
    "s3 with what it needs": ({"s3": S3, "redirect": {"disable": True}}, []),
    "unknown driver, close to one": (
        {"azur": {}},
        ["registry.storage.azur: unknown storage driver; did you mean azure?"],
    ),
    "unknown driver, a number": (
        {7: {}},
        [f"registry.storage.7: unknown storage driver; drivers: {DRIVERS}"],
    ),
    "two drivers": (
        {"s3": S3, "gcs": {"bucket": "b"}},
        ["registry.storage: one driver at a time, found s3, gcs"],
    ),
    "an extra that is not a mapping": (
        {"maintenance": "readonly"},
        ["registry.storage.maintenance: expected a mapping, as in the registry's own config"],
    ),
    "redirect.disable not a boolean": (
        {"redirect": {"disable": "yes"}},
        ["registry.storage.redirect: expected {disable: true|false}"],
    ),
}

DRIVER = {
    "no parameters at all": (
        "swift",
        None,
        [
            "registry.storage.swift.username: required by the swift driver",
            "registry.storage.swift.password: required by the swift driver",
            "registry.storage.swift.authurl: required by the swift driver",
            "registry.storage.swift.container: required by the swift driver",
        ],
    ),
    "parameters not a mapping": (
        "gcs",
        "bucket",
        ["registry.storage.gcs: expected a mapping of driver settings"],
    ),
    "a parameter name that is a number": (
        "filesystem",
        {1: "x"},
        ["registry.storage.filesystem: parameter names must be strings"],
    ),
    "regionendpoint without a scheme": (
        "s3",
        {**S3, "regionendpoint": "minio:9000"},
        [
            'registry.storage.s3.regionendpoint: "minio:9000" is not a URL such as '
            "http://127.0.0.1:9000"
        ],
    ),
    "relative rootdirectory": (
        "filesystem",
        {"rootdirectory": "images"},
        [
            'registry.storage.filesystem.rootdirectory: "images" is not an absolute path without '
            "spaces, quotes or shell characters"
        ],
    ),
    "chunksize too small, or true": (
        "s3",
        {**S3, "chunksize": True},
        [
            "registry.storage.s3.chunksize: must be a whole number of bytes, at least 5242880 "
            "(25000000 to 50000000 is typical)"
        ],
    ),
    "everything in order": (
        "s3",
        {**S3, "chunksize": 5242880, "regionendpoint": "http://127.0.0.1:9000"},
        [],
    ),
}

NOTIFICATIONS = {
    "none": ([], []),
    "two endpoints, one name": (
        [{"name": "a", "url": URL}, {"name": "a", "url": URL}],
        ['registry.notifications[1].name: "a" is used twice'],
    ),
    "not a mapping": (
        ["http://x"],
        ["registry.notifications[0]: expected a mapping with name and url"],
    ),
    "names that are not strings are not compared": (
        [{"name": ["a"], "url": URL}, {"name": ["a"], "url": URL}],
        [
            "registry.notifications[0].name: ['a'] is not a string",
            "registry.notifications[1].name: ['a'] is not a string",
        ],
    ),
}

W = "registry.notifications[0]"
ENDPOINT = {
    "complete": (
        {
            "name": "a",
            "url": URL,
            "timeout": "500ms",
            "threshold": 5,
            "backoff": "1s",
            "disabled": False,
            "ignoredmediatypes": ["x"],
            "ignore": {"actions": ["pull"]},
            "headers": {"Authorization": ["Bearer T"]},
        },
        [],
    ),
    "empty": (
        {},
        [f"{W}.name: required", f"{W}.url: required, a URL starting with http:// or https://"],
    ),
    "a typo in a key": (
        {"name": "a", "url": URL, "urls": URL},
        [f"{W}.urls: unknown key; did you mean url?"],
    ),
    "durations and counts": (
        {"name": "a", "url": URL, "timeout": "fast", "backoff": 1, "threshold": 0},
        [
            f'{W}.timeout: "fast" is not a duration such as 500ms, 1s or 5m',
            f"{W}.backoff: 1 is not a duration such as 500ms, 1s or 5m",
            f"{W}.threshold: a whole number of failures, at least 1",
        ],
    ),
    "filters in the wrong shape": (
        {
            "name": "a",
            "url": URL,
            "disabled": "no",
            "ignoredmediatypes": "x",
            "ignore": {"actions": "pull"},
        },
        [
            f"{W}.disabled: true or false",
            f"{W}.ignoredmediatypes: a list of media types",
            f"{W}.ignore: a mapping with mediatypes and actions, each a list of strings, e.g. "
            f"{{actions: [pull]}}",
        ],
    ),
    "a header value that is no list": (
        {"name": "a", "url": URL, "headers": {"Authorization": "Bearer T"}},
        [
            f"{W}.headers: a mapping of header name to a list of strings, e.g. "
            f'{{Authorization: ["Bearer TOKEN"]}}'
        ],
    ),
}

ENV = {
    "plain values": ({"GOGC": 400, "REGISTRY_HTTP_RELATIVEURLS": True, "A": "it's"}, []),
    "a lower-case name": (
        {"gogc": 1},
        ["registry.env.gogc: not an environment variable name (A-Z, 0-9, _)"],
    ),
    "a value on two lines": (
        {"A": "a\nb"},
        ["registry.env.A: a single-line string, number or boolean"],
    ),
    "a value in quotes": (
        {"A": '"x"'},
        [
            "registry.env.A: a value that neither starts nor ends with a quote and does not "
            "contain both ' and \""
        ],
    ),
}

NGINX = {
    "defaults": (NginxSettings(), []),
    "no address": (
        NginxSettings(listen_addresses=[]),
        ["nginx.listen_addresses: at least one address"],
    ),
    "a name, a zone, a number": (
        NginxSettings(listen_addresses=["localhost", "fe80::1%eth0", 80]),
        [
            "nginx.listen_addresses[0]: \"localhost\" is not an IP address, '*' or '[::]'",
            'nginx.listen_addresses[1]: "fe80::1%eth0" is not an address without an IPv6 zone ID: '
            "nginx, the registry and gunicorn take no '%eth0'; use the interface's own address",
            "nginx.listen_addresses[2]: 80 is not an IP address, '*' or '[::]'",
        ],
    ),
    "worker_processes in other digits": (
        NginxSettings(worker_processes="٣"),
        ["nginx.worker_processes: \"٣\" is not 'auto' or a number"],
    ),
}

EMAILS = {
    "fine": (["admin@example.com"], []),
    "a word and a number": (
        ["admin", 5],
        [
            'letsencrypt.contact_emails[0]: "admin" is not an email address',
            "letsencrypt.contact_emails[1]: 5 is not an email address",
        ],
    ),
}

CERT = RegistryNginxSettings(ssl_certificate="/etc/ssl/r.crt")
TLS = {
    "defaults": (RawSettings(), set(), []),
    "a certificate without its key": (
        RawSettings(registry_nginx=CERT),
        set(),
        [
            "registry_nginx.ssl_certificate_key: set both ssl_certificate and ssl_certificate_key, "
            "or neither"
        ],
    ),
    "... unless the key was refused already": (
        RawSettings(registry_nginx=CERT),
        {"registry_nginx.ssl_certificate_key"},
        [],
    ),
    "certificate files and Let's Encrypt": (
        RawSettings(
            registry_nginx=RegistryNginxSettings(
                ssl_certificate="/r.crt", ssl_certificate_key="/r.key"
            ),
            letsencrypt=LetsEncryptSettings(enable=True),
        ),
        set(),
        [
            "letsencrypt.enable: true conflicts with registry_nginx.ssl_certificate; remove the "
            "certificate paths to use Let's Encrypt, or set letsencrypt.enable: false"
        ],
    ),
    "a plain-HTTP registry": (
        RawSettings(registry_external_url="http://registry.example.com"),
        set(),
        [
            'registry_external_url: "http://registry.example.com" must be https; clients '
            "refuse plain-HTTP registries unless each one is told it is insecure"
        ],
    ),
}

PORTS = {
    "defaults": (RawSettings(), []),
    "nginx's two ports the same": (
        RawSettings(nginx=NginxSettings(http_port=5050)),
        ["registry_nginx.listen_port: 5050 is also nginx.http_port; pick another port"],
    ),
    "auth on the registry's address": (
        RawSettings(auth=AuthSettings(listen_addr="127.0.0.1:5000", listen_network="tcp")),
        ["auth.listen_addr: 127.0.0.1:5000 is also registry.http_addr; pick another port"],
    ),
    "the registry on the port nginx binds everywhere": (
        RawSettings(registry=RegistrySettings(http_addr="127.0.0.1:5050")),
        [
            "registry.http_addr: 127.0.0.1:5050 is also registry_nginx.listen_port, where nginx "
            "listens; pick another port"
        ],
    ),
    "... but not when nginx listens elsewhere": (
        RawSettings(
            registry=RegistrySettings(http_addr="127.0.0.1:5050"),
            nginx=NginxSettings(listen_addresses=["192.0.2.1"]),
        ),
        [],
    ),
    "a unix socket path too long": (
        RawSettings(
            root="/" + "r" * 100,
            registry=RegistrySettings(listen_network="unix"),
            auth=AuthSettings(listen_network="tcp"),
        ),
        [
            f"registry.listen_network: the socket path /{'r' * 100}/var/opt/appliance/"
            f"registry-socket/registry.sock is longer than the 107 bytes a unix socket may "
            f"have; use a shorter root, or listen_network: tcp"
        ],
    ),
}


def table(cases: dict) -> Any:
    return pytest.mark.parametrize("case", list(cases.values()), ids=list(cases))


@table(STORAGE)
def test_storage(case: tuple) -> None:
    storage, expected = case
    assert settings.check_storage(storage) == expected


@table(DRIVER)
def test_driver(case: tuple) -> None:
    name, params, expected = case
    assert settings.check_driver(name, params) == expected


@table(NOTIFICATIONS)
def test_notifications(case: tuple) -> None:
    endpoints, expected = case
    assert settings.check_notifications(endpoints) == expected


@table(ENDPOINT)
def test_endpoint(case: tuple) -> None:
    endpoint, expected = case
    assert settings.check_endpoint(W, endpoint) == expected


@table(ENV)
def test_env(case: tuple) -> None:
    env, expected = case
    assert settings.check_env(env) == expected


@table(NGINX)
def test_nginx(case: tuple) -> None:
    nginx, expected = case
    assert settings.check_nginx(nginx) == expected


@table(EMAILS)
def test_contact_emails(case: tuple) -> None:
    emails, expected = case
    assert settings.check_contact_emails(emails) == expected


@table(TLS)
def test_tls(case: tuple) -> None:
    s, rejected, expected = case
    assert settings.check_tls(s, rejected) == expected


@table(PORTS)
def test_ports(case: tuple) -> None:
    s, expected = case
    assert settings.check_ports(s) == expected
