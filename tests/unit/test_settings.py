"""appliance.yml: every bad config names its key and what is expected; derivation is pure.

The bad-config table asserts the complete list of problems, not a substring, so an
extra misleading problem (one error reported twice, a check firing on a value the
admin never wrote) fails the test as surely as a missing one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

import pytest
import yaml

from appliance import pki, settings
from appliance.errors import ConfigError
from appliance.settings import (
    HostFacts,
    LetsEncryptSettings,
    RawSettings,
    RegistryNginxSettings,
    RegistrySettings,
    Settings,
    derive,
    example_config,
)
from tests.support.appliance import deep_merge

PORT_MSG = "is not host:port with a port 1-65535"
PATH_MSG = "is not a path without spaces, quotes, ';', '{', '}', '$', '#' or backslashes"
URL_MSG = "is not a URL without spaces, quotes, ';', '{', '}' or '$'"
S3 = {"bucket": "registry", "region": "us-east-1"}


def load_text(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "appliance.yml"
    path.write_text(text)
    return settings.load(path, must_exist=True)


def load(tmp_path: Path, data: dict) -> Settings:
    return load_text(tmp_path, yaml.safe_dump(data, sort_keys=False))


def problems_of(tmp_path: Path, data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, data)
    return caught.value.problems


# (config, every problem it must produce)
BAD_CONFIGS = {
    "port out of range": (
        {"registry": {"http_addr": "localhost:99999"}},
        [f'registry.http_addr: "localhost:99999" {PORT_MSG}'],
    ),
    "host without port": (
        {"auth": {"listen_addr": "127.0.0.1"}},
        [f'auth.listen_addr: "127.0.0.1" {PORT_MSG}'],
    ),
    "port not a number": (
        {"registry": {"debug_addr": "127.0.0.1:http"}},
        [f'registry.debug_addr: "127.0.0.1:http" {PORT_MSG}'],
    ),
    "bad host in host:port": (
        {"registry": {"http_addr": "bad_host!:5000"}},
        [f'registry.http_addr: "bad_host!:5000" {PORT_MSG}'],
    ),
    "http_port 0": (
        {"nginx": {"http_port": 0}},
        ["nginx.http_port: 0 is not a port number 1-65535"],
    ),
    "listen_port too big": (
        {"registry_nginx": {"listen_port": 70000}},
        ["registry_nginx.listen_port: 70000 is not a port number 1-65535"],
    ),
    "unknown top-level key": (
        {"registy": {"enable": True}},
        ["registy: unknown key; did you mean registry?"],
    ),
    "unknown nested key": (
        {"registry": {"http_adr": "127.0.0.1:5000"}},
        ["registry.http_adr: unknown key; did you mean registry.http_addr?"],
    ),
    "unknown key, nothing close": (
        {"letsencrypt": {"zzz": 1}},
        [
            "letsencrypt.zzz: unknown key; valid keys here: auto_renew, ca_bundle, "
            "contact_emails, directory_url, enable, key_type, renew_before_days, runs_per_day"
        ],
    ),
    "string for a boolean": (
        {"registry": {"enable": "yes"}},
        ['registry.enable: "yes" is not true or false'],
    ),
    "string for a number": (
        {"auth": {"workers": "2"}},
        ['auth.workers: "2" is not a whole number'],
    ),
    "boolean for a number": (
        {"auth": {"token_lifetime": True}},
        ["auth.token_lifetime: True is not a whole number"],
    ),
    "number for a string": ({"external_url": 443}, ["external_url: 443 is not a string"]),
    "list for a mapping": (
        {"registry": {"storage": ["s3"]}},
        ["registry.storage: ['s3'] is not a mapping"],
    ),
    "scalar for a section": ({"nginx": "on"}, ["nginx: expected a mapping of keys, got 'on'"]),
    "zero workers": ({"auth": {"workers": 0}}, ["auth.workers: 0 is not a number greater than 0"]),
    "renewal a billion days ahead": (
        {"letsencrypt": {"renew_before_days": 1_000_000_000}},
        ["letsencrypt.renew_before_days: 1000000000 is not a number of days from 1 to 3650"],
    ),
    "s3 without bucket and region": (
        {"registry": {"storage": {"s3": {"accesskey": "AKIA"}}}},
        [
            "registry.storage.s3.bucket: required by the s3 driver",
            "registry.storage.s3.region: required by the s3 driver",
        ],
    ),
    "unknown driver, close to one": (
        {"registry": {"storage": {"azur": {}}}},
        ["registry.storage.azur: unknown storage driver; did you mean azure?"],
    ),
    "unknown driver, close to none": (
        {"registry": {"storage": {"ceph": {}}}},
        [
            "registry.storage.ceph: unknown storage driver; drivers: filesystem, s3, azure, gcs, "
            "swift, oss, inmemory"
        ],
    ),
    "two drivers": (
        {"registry": {"storage": {"s3": S3, "gcs": {"bucket": "b"}}}},
        ["registry.storage: one driver at a time, found s3, gcs"],
    ),
    "driver settings not a mapping": (
        {"registry": {"storage": {"s3": "bucket"}}},
        ["registry.storage.s3: expected a mapping of driver settings"],
    ),
    "regionendpoint without scheme": (
        {"registry": {"storage": {"s3": {**S3, "regionendpoint": "minio:9000"}}}},
        [
            'registry.storage.s3.regionendpoint: "minio:9000" is not a URL such as '
            "http://127.0.0.1:9000"
        ],
    ),
    "chunksize too small": (
        {"registry": {"storage": {"s3": {**S3, "chunksize": 1024}}}},
        [
            "registry.storage.s3.chunksize: must be a whole number of bytes, at least 5242880 "
            "(25000000 to 50000000 is typical)"
        ],
    ),
    "redirect not a boolean": (
        {"registry": {"storage": {"redirect": {"disable": "yes"}}}},
        ["registry.storage.redirect: expected {disable: true|false}"],
    ),
    "notification without name": (
        {"registry": {"notifications": [{"url": "https://hooks.example.com/e"}]}},
        ["registry.notifications[0].name: required"],
    ),
    "notification without url": (
        {"registry": {"notifications": [{"name": "hook"}]}},
        ["registry.notifications[0].url: required, a URL starting with http:// or https://"],
    ),
    "notification bad url": (
        {"registry": {"notifications": [{"name": "hook", "url": "hooks.example.com"}]}},
        ["registry.notifications[0].url: required, a URL starting with http:// or https://"],
    ),
    "notification bad timeout": (
        {
            "registry": {
                "notifications": [{"name": "hook", "url": "https://h.example.com", "timeout": "5"}]
            }
        },
        ['registry.notifications[0].timeout: "5" is not a duration such as 500ms, 1s or 5m'],
    ),
    "notification names twice": (
        {
            "registry": {
                "notifications": [
                    {"name": "hook", "url": "https://a.example.com"},
                    {"name": "hook", "url": "https://b.example.com"},
                ]
            }
        },
        ['registry.notifications[1].name: "hook" is used twice'],
    ),
    "notification headers not lists": (
        {
            "registry": {
                "notifications": [
                    {
                        "name": "hook",
                        "url": "https://h.example.com",
                        "headers": {"Authorization": "Bearer x"},
                    }
                ]
            }
        },
        [
            "registry.notifications[0].headers: a mapping of header name to a list of strings, "
            'e.g. {Authorization: ["Bearer TOKEN"]}'
        ],
    ),
    "notification unknown key and zero threshold": (
        {
            "registry": {
                "notifications": [
                    {"name": "hook", "url": "https://h.example.com", "treshold": 5, "threshold": 0}
                ]
            }
        },
        [
            "registry.notifications[0].treshold: unknown key; did you mean threshold?",
            "registry.notifications[0].threshold: a whole number of failures, at least 1",
        ],
    ),
    "notification not a mapping": (
        {"registry": {"notifications": ["https://h.example.com"]}},
        ["registry.notifications[0]: expected a mapping with name and url"],
    ),
    "env lower-case name": (
        {"registry": {"env": {"registry_http_secret": "x"}}},
        ["registry.env.registry_http_secret: not an environment variable name (A-Z, 0-9, _)"],
    ),
    "env multi-line value": (
        {"registry": {"env": {"REGISTRY_X": "a\nb"}}},
        ["registry.env.REGISTRY_X: a single-line string, number or boolean"],
    ),
    "env value supervisord cannot quote": (
        {"registry": {"env": {"REGISTRY_X": "'quoted'", "REGISTRY_Y": 'it\'s "both"'}}},
        [
            "registry.env.REGISTRY_X: a value that neither starts nor ends with a quote and does "
            "not contain both ' and \"",
            "registry.env.REGISTRY_Y: a value that neither starts nor ends with a quote and does "
            "not contain both ' and \"",
        ],
    ),
    "env nested value": (
        {"registry": {"env": {"REGISTRY_X": {"a": 1}}}},
        ["registry.env.REGISTRY_X: a single-line string, number or boolean"],
    ),
    "listen address is a name": (
        {"nginx": {"listen_addresses": ["127.0.0.1", "localhost"]}},
        ["nginx.listen_addresses[1]: \"localhost\" is not an IP address, '*' or '[::]'"],
    ),
    "no listen address": (
        {"nginx": {"listen_addresses": []}},
        ["nginx.listen_addresses: at least one address"],
    ),
    "http registry URL": (
        {"registry_external_url": "http://registry.example.com"},
        [
            'registry_external_url: "http://registry.example.com" must be https; clients refuse '
            "plain-HTTP registries unless each one is told it is insecure"
        ],
    ),
    "registry URL with a path": (
        {"registry_external_url": "https://example.com/registry"},
        [
            'registry_external_url: "https://example.com/registry" is not a URL with no path, '
            "like https://registry.example.com"
        ],
    ),
    "URL without scheme": (
        {"external_url": "example.com"},
        ['external_url: "example.com" is not a URL starting with http:// or https://'],
    ),
    "URL with a bad port": (
        {"registry_external_url": "https://example.com:99999"},
        ['registry_external_url: "https://example.com:99999" is not a URL with a port 1-65535'],
    ),
    "certificate without key": (
        {"registry_nginx": {"ssl_certificate": "/etc/ssl/r.crt"}},
        [
            "registry_nginx.ssl_certificate_key: set both ssl_certificate and "
            "ssl_certificate_key, or neither"
        ],
    ),
    "key without certificate": (
        {"registry_nginx": {"ssl_certificate_key": "/etc/ssl/r.key"}},
        [
            "registry_nginx.ssl_certificate_key: set both ssl_certificate and "
            "ssl_certificate_key, or neither"
        ],
    ),
    "letsencrypt with certificate files": (
        {
            "letsencrypt": {"enable": True},
            "registry_nginx": {
                "ssl_certificate": "/etc/ssl/r.crt",
                "ssl_certificate_key": "/etc/ssl/r.key",
            },
        },
        [
            "letsencrypt.enable: true conflicts with registry_nginx.ssl_certificate; remove the "
            "certificate paths to use Let's Encrypt, or set letsencrypt.enable: false"
        ],
    ),
    "vhost on the plain-HTTP port": (
        {"registry_nginx": {"listen_port": 80}},
        ["registry_nginx.listen_port: 80 is also nginx.http_port; pick another port"],
    ),
    "plain-HTTP port on the default vhost port": (
        {"nginx": {"http_port": 5050}},
        ["registry_nginx.listen_port: 5050 is also nginx.http_port; pick another port"],
    ),
    "plain-HTTP port on the registry URL's port": (
        {"registry_external_url": "https://registry.example.com", "nginx": {"http_port": 443}},
        ["registry_nginx.listen_port: 443 is also nginx.http_port; pick another port"],
    ),
    "registry on the vhost's port": (
        {"registry": {"http_addr": "127.0.0.1:5050"}},
        [
            "registry.http_addr: 127.0.0.1:5050 is also registry_nginx.listen_port, where nginx "
            "listens; pick another port"
        ],
    ),
    "auth on the plain-HTTP port of nginx's address": (
        {
            "auth": {"listen_network": "tcp", "listen_addr": "127.0.0.1:8080"},
            "nginx": {"http_port": 8080, "listen_addresses": ["127.0.0.1"]},
        },
        [
            "auth.listen_addr: 127.0.0.1:8080 is also nginx.http_port, where nginx listens; "
            "pick another port"
        ],
    ),
    "debug on all addresses, nginx on one": (
        {"registry": {"debug_addr": "0.0.0.0:5050"}, "nginx": {"listen_addresses": ["192.0.2.7"]}},
        [
            "registry.debug_addr: 0.0.0.0:5050 is also registry_nginx.listen_port, where nginx "
            "listens; pick another port"
        ],
    ),
    "auth on the registry's address": (
        {"auth": {"listen_network": "tcp", "listen_addr": "127.0.0.1:5000"}},
        ["auth.listen_addr: 127.0.0.1:5000 is also registry.http_addr; pick another port"],
    ),
    "debug on the registry's address": (
        {"registry": {"http_addr": "127.0.0.1:6000", "debug_addr": "127.0.0.1:6000"}},
        ["registry.debug_addr: 127.0.0.1:6000 is also registry.http_addr; pick another port"],
    ),
    "listen_network neither tcp nor unix": (
        {"registry": {"listen_network": "socket"}},
        ['registry.listen_network: "socket" is not tcp or unix'],
    ),
    "socket path too long for a unix socket": (
        {"root": "/srv/" + "r" * 60, "registry": {"listen_network": "unix"}},
        [
            f"registry.listen_network: the socket path /srv/{'r' * 60}/var/opt/appliance/"
            f"registry-socket/registry.sock is longer than the 107 bytes a unix socket may have; "
            f"use a shorter root, or listen_network: tcp"
        ],
    ),
    "';' in root": ({"root": "/srv/a;b"}, [f'root: "/srv/a;b" {PATH_MSG}']),
    "'{' in storage path": (
        {"registry": {"storage_path": "/srv/{registry}"}},
        [f'registry.storage_path: "/srv/{{registry}}" {PATH_MSG}'],
    ),
    "newline in certificate paths": (
        {
            "registry_nginx": {
                "ssl_certificate": "/etc/ssl/r.crt\nevil",
                "ssl_certificate_key": "/etc/ssl/r.key\nevil",
            }
        },
        [
            f'registry_nginx.ssl_certificate: "/etc/ssl/r.crt\\nevil" {PATH_MSG}',
            f'registry_nginx.ssl_certificate_key: "/etc/ssl/r.key\\nevil" {PATH_MSG}',
        ],
    ),
    "bad certificate path is one problem, not also 'set both'": (
        {
            "registry_nginx": {
                "ssl_certificate": "/etc/ssl/my cert.crt",
                "ssl_certificate_key": "/etc/ssl/r.key",
            }
        },
        [f'registry_nginx.ssl_certificate: "/etc/ssl/my cert.crt" {PATH_MSG}'],
    ),
    "quote in database path": (
        {"auth": {"database_path": "/srv/a'b.db"}},
        [f'auth.database_path: "/srv/a\'b.db" {PATH_MSG}'],
    ),
    "database URL with its password: the password is not repeated": (
        {"auth": {"database_url": "postgresql://app:hunter2@db.example.org/registry"}},
        [
            'auth.database_url: "postgresql://app:***@db.example.org/registry" is not a usable'
            " database URL: it must not hold the password (postgresql://user@host:port/db);"
            " put it in the file named by auth.database_password_file"
        ],
    ),
    "database URL with a password parameter: the password is not repeated": (
        {"auth": {"database_url": "postgresql://app@db/registry?sslmode=require&password=hunter2"}},
        [
            'auth.database_url: "postgresql://app@db/registry?sslmode=require&password=***" is'
            " not a usable database URL: it must not hold the password"
            " (postgresql://user@host:port/db); put it in the file named by"
            " auth.database_password_file"
        ],
    ),
    "database URL of another engine": (
        {"auth": {"database_url": "mysql://app@db/registry"}},
        [
            'auth.database_url: "mysql://app@db/registry" is not a usable database URL: it'
            " must start with postgresql://"
        ],
    ),
    "database URL without a database": (
        {"auth": {"database_url": "postgresql://app@db.example.org:5432"}},
        [
            'auth.database_url: "postgresql://app@db.example.org:5432" is not a usable'
            " database URL: it names no database (or more than one path part):"
            " postgresql://user@host:port/db"
        ],
    ),
    "database URL without a user": (
        {"auth": {"database_url": "postgresql://db.example.org/registry"}},
        [
            'auth.database_url: "postgresql://db.example.org/registry" is not a usable'
            " database URL: it names no user: postgresql://user@host:port/db"
        ],
    ),
    "two databases named": (
        {"auth": {"database_url": "postgresql://a@db/r", "database_path": "/srv/auth.db"}},
        [
            "auth.database_path: set together with auth.database_url; remove one"
            " (database_path is the SQLite file, database_url the PostgreSQL database)"
        ],
    ),
    "a password file without a database URL": (
        {"auth": {"database_password_file": "/etc/appliance/db-password"}},
        [
            "auth.database_password_file: only used with auth.database_url; set"
            " database_url or remove it"
        ],
    ),
    "relative path": (
        {"registry": {"key_path": "keys/token.key"}},
        ['registry.key_path: "keys/token.key" is not an absolute path'],
    ),
    "';' in URL host": (
        {"external_url": "https://exa;mple.com"},
        [f'external_url: "https://exa;mple.com" {URL_MSG}'],
    ),
    "'{' in registry URL": (
        {"registry_external_url": "https://reg{x}.example.com"},
        [f'registry_external_url: "https://reg{{x}}.example.com" {URL_MSG}'],
    ),
    "quote in URL": (
        {"external_url": 'https://example.com/"'},
        [f'external_url: "https://example.com/\\"" {URL_MSG}'],
    ),
    "newline in URL": (
        {"registry_external_url": "https://example.com\nserver_name evil"},
        [f'registry_external_url: "https://example.com\\nserver_name evil" {URL_MSG}'],
    ),
    "ACME directory not http": (
        {"letsencrypt": {"directory_url": "ftp://acme.example.com/dir"}},
        [
            'letsencrypt.directory_url: "ftp://acme.example.com/dir" is not a URL starting with '
            "http:// or https://"
        ],
    ),
    "bad contact email": (
        {"letsencrypt": {"contact_emails": ["admin@example.com", "admin"]}},
        ['letsencrypt.contact_emails[1]: "admin" is not an email address'],
    ),
    "bad key type": (
        {"letsencrypt": {"key_type": "dsa"}},
        [
            'letsencrypt.key_type: "dsa" is not one of ec-p256, ec-p384, rsa-2048, rsa-3072, '
            "rsa-4096"
        ],
    ),
    "worker_processes word": (
        {"nginx": {"worker_processes": "many"}},
        ["nginx.worker_processes: \"many\" is not 'auto' or a number"],
    ),
    "internal_key not PEM, value not echoed": (
        {"registry": {"internal_key": "hunter2"}},
        [
            "registry.internal_key: the value is not a PEM private key "
            "(-----BEGIN ... PRIVATE KEY-----)"
        ],
    ),
}


@pytest.mark.parametrize(("config", "expected"), list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_names_key_and_expectation(
    tmp_path: Path, config: dict, expected: list[str]
) -> None:
    assert problems_of(tmp_path, config) == expected


def test_every_problem_of_a_config_comes_back_in_one_error(tmp_path: Path) -> None:
    cases = [
        "port out of range",
        "unknown top-level key",
        "string for a boolean",
        "s3 without bucket and region",
        "notification without url",
        "env lower-case name",
        "listen address is a name",
        "http registry URL",
        "';' in root",
        "auth on the registry's address",
        "bad contact email",
        "http_port 0",
    ]
    config: dict = {}
    expected: list[str] = []
    for case in cases:
        one, problems = BAD_CONFIGS[case]
        config = deep_merge(config, one)
        expected += problems
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, config)
    assert sorted(caught.value.problems) == sorted(expected)
    assert str(caught.value) == (
        f"{tmp_path / 'appliance.yml'}: {len(expected)} problems found; nothing was changed."
    )


# ---------------------------------------------------------------- files that are not configs

BAD_FILES = {
    "indentation": (
        "registry:\n  http_addr: 127.0.0.1:5000\n enable: true\n",
        "not valid YAML at line 3, column 2: expected <block end>, but found "
        "'<block mapping start>'.",
    ),
    "unclosed flow mapping": (
        "nginx: {http_port: 80\n",
        "not valid YAML at line 2, column 1: expected ',' or '}', but got '<stream end>'.",
    ),
    "colon in a plain value": (
        "root: a: b\n",
        "not valid YAML at line 1, column 8: mapping values are not allowed here.",
    ),
    "tab": (
        "registry:\n\tenable: true\n",
        "not valid YAML at line 2, column 1: found character '\\t' that cannot start any token.",
    ),
    "key twice": (
        "root: /srv/a\nnginx: {}\nroot: /srv/b\n",
        "not valid YAML at line 3, column 1: the key 'root' appears twice in one mapping.",
    ),
    "nested key twice": (
        "registry:\n  enable: true\n  enable: false\n",
        "not valid YAML at line 3, column 3: the key 'enable' appears twice in one mapping.",
    ),
    "list at the top": ("- root: /srv\n", "the top level must be a mapping of keys, not list."),
    "string at the top": ("registry\n", "the top level must be a mapping of keys, not str."),
}


@pytest.mark.parametrize(("text", "message"), list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_unreadable_config_says_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    assert str(caught.value) == f"{tmp_path / 'appliance.yml'}: {message}"
    assert caught.value.exit_code == 2


def test_empty_file_and_missing_default_file_mean_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "# nothing set\n").external_url == "https://localhost"
    missing = settings.load(tmp_path / "absent.yml", must_exist=False)
    assert missing.registry.http_addr == "127.0.0.1:5000"


def test_named_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        settings.load(tmp_path / "absent.yml", must_exist=True)
    assert str(caught.value) == (
        f"{tmp_path / 'absent.yml'}: no such file; create it "
        f"(appliance-ctl example-config prints a commented one) or "
        f"leave out -c."
    )


def test_empty_section_means_its_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "registry:\nnginx:\n").registry.enable is True


# ---------------------------------------------------------------- derivation


def attribute(s: object, dotted: str) -> object:
    for name in dotted.split("."):
        s = getattr(s, name)
    return str(s) if isinstance(s, Path) else s


# (config, derived values it must give)
DERIVATIONS = {
    "defaults: self-signed localhost on 5050": (
        {},
        {
            "registry_external_url": "https://localhost:5050",
            "registry_host": "localhost",
            "registry_port": 5050,
            "registry_nginx.listen_port": 5050,
            "registry_on_own_domain": False,
            "letsencrypt.enable": False,
            "tls_mode": "self-signed",
            "registry_nginx.ssl_certificate": "/etc/appliance/ssl/localhost.crt",
            "registry_nginx.ssl_certificate_key": "/etc/appliance/ssl/localhost.key",
            "token_realm": "https://localhost:5050/jwt/auth",
        },
    ),
    "public host: port 5050 of it, Let's Encrypt on": (
        {"external_url": "https://gitlab.corp.com"},
        {
            "registry_external_url": "https://gitlab.corp.com:5050",
            "registry_port": 5050,
            "registry_nginx.listen_port": 5050,
            "letsencrypt.enable": True,
            "tls_mode": "letsencrypt",
            "registry_nginx.ssl_certificate": "/etc/appliance/ssl/gitlab.corp.com.crt",
        },
    ),
    "http external_url still serves the registry on https": (
        {"external_url": "http://gitlab.corp.com"},
        {"registry_external_url": "https://gitlab.corp.com:5050", "letsencrypt.enable": True},
    ),
    "port of external_url does not move the registry": (
        {"external_url": "https://gitlab.corp.com:8443"},
        {
            "registry_external_url": "https://gitlab.corp.com:5050",
            "registry_nginx.listen_port": 5050,
        },
    ),
    "own domain: port 443, certificate named after it": (
        {
            "external_url": "https://gitlab.corp.com",
            "registry_external_url": "https://registry.corp.com/",
        },
        {
            "registry_external_url": "https://registry.corp.com",
            "registry_host": "registry.corp.com",
            "registry_port": 443,
            "registry_nginx.listen_port": 443,
            "registry_on_own_domain": True,
            "host": "gitlab.corp.com",
            "registry_nginx.ssl_certificate": "/etc/appliance/ssl/registry.corp.com.crt",
            "registry_nginx.ssl_certificate_key": "/etc/appliance/ssl/registry.corp.com.key",
            "token_realm": "https://registry.corp.com/jwt/auth",
        },
    ),
    "listen_port follows the URL's port": (
        {"registry_external_url": "https://registry.corp.com:8443"},
        {"registry_port": 8443, "registry_nginx.listen_port": 8443},
    ),
    "explicit listen_port (behind a proxy) wins": (
        {
            "registry_external_url": "https://registry.corp.com",
            "nginx": {"http_port": 8080},
            "registry_nginx": {"listen_port": 5443},
        },
        {"registry_port": 443, "registry_nginx.listen_port": 5443},
    ),
    "IP address: no Let's Encrypt": (
        {"external_url": "https://192.0.2.10"},
        {
            "registry_external_url": "https://192.0.2.10:5050",
            "letsencrypt.enable": False,
            "registry_nginx.ssl_certificate": "/etc/appliance/ssl/192.0.2.10.crt",
        },
    ),
    "IPv6 address: bracketed in the URL": (
        {"external_url": "https://[2001:db8::1]"},
        {
            "registry_external_url": "https://[2001:db8::1]:5050",
            "registry_host": "2001:db8::1",
            "registry_port": 5050,
            "letsencrypt.enable": False,
        },
    ),
    ".test name: no Let's Encrypt": (
        {"registry_external_url": "https://registry.appliance.test"},
        {"letsencrypt.enable": False, "tls_mode": "self-signed"},
    ),
    "single-label name: no Let's Encrypt": (
        {"external_url": "https://registry"},
        {"letsencrypt.enable": False},
    ),
    "certificate files: no Let's Encrypt, paths kept": (
        {
            "registry_external_url": "https://registry.corp.com",
            "registry_nginx": {
                "ssl_certificate": "/etc/pki/r.pem",
                "ssl_certificate_key": "/etc/pki/r.key",
            },
        },
        {
            "letsencrypt.enable": False,
            "tls_mode": "files",
            "registry_nginx.ssl_certificate": "/etc/pki/r.pem",
            "registry_nginx.ssl_certificate_key": "/etc/pki/r.key",
        },
    ),
    "Let's Encrypt turned off on a public name": (
        {"registry_external_url": "https://registry.corp.com", "letsencrypt": {"enable": False}},
        {"letsencrypt.enable": False, "tls_mode": "self-signed"},
    ),
    "Let's Encrypt forced on for a .test name": (
        {
            "registry_external_url": "https://registry.appliance.test",
            "letsencrypt": {"enable": True},
        },
        {"letsencrypt.enable": True, "tls_mode": "letsencrypt"},
    ),
    "same port as the vhost on another address is fine": (
        {"registry": {"http_addr": "127.0.0.1:5050"}, "nginx": {"listen_addresses": ["192.0.2.7"]}},
        {"registry.http_addr": "127.0.0.1:5050", "registry_nginx.listen_port": 5050},
    ),
    "on a socket the registry's http_addr may be anything": (
        {"registry": {"listen_network": "unix", "http_addr": "127.0.0.1:5050"}},
        {"registry.listen_network": "unix"},
    ),
    "registry off turns its vhost off": (
        {"registry": {"enable": False}},
        {"registry_nginx.enable": False},
    ),
    "explicit paths are kept": (
        {
            "root": "/srv/appliance",
            "registry": {"storage_path": "/data/registry", "key_path": "/keys/token.key"},
            "auth": {"database_path": "/data/auth.db"},
        },
        {
            "registry.storage_path": "/data/registry",
            "registry.key_path": "/keys/token.key",
            "auth.database_path": "/data/auth.db",
            "auth_database": "/data/auth.db",
        },
    ),
}


@pytest.mark.parametrize(("config", "expected"), list(DERIVATIONS.values()), ids=list(DERIVATIONS))
def test_derivation(tmp_path: Path, config: dict, expected: dict) -> None:
    derived = load(tmp_path, config)
    assert {key: attribute(derived, key) for key in expected} == expected


def test_root_moves_every_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    derived = load(tmp_path, {"root": str(root)})
    paths = dataclasses.asdict(derived.paths)
    del paths["config_file"]  # where the admin keeps the file; not derived from root
    paths.update(
        {
            "registry.storage_path": derived.registry.storage_path,
            "registry.key_path": derived.registry.key_path,
            "auth.database_path": derived.auth.database_path,
            "ssl_certificate": derived.registry_nginx.ssl_certificate,
            "ssl_certificate_key": derived.registry_nginx.ssl_certificate_key,
        }
    )
    outside = {
        name: str(value)
        for name, value in paths.items()
        if not str(value).startswith(f"{root}/") and str(value) != str(root)
    }
    assert outside == {}
    assert derived.paths.config_file == tmp_path / "appliance.yml"
    assert derived.registry_nginx.ssl_certificate == f"{root}/etc/appliance/ssl/localhost.crt"
    assert derived.paths.secrets_file == root / "etc/appliance/appliance-secrets.json"
    assert derived.registry.storage_path == f"{root}/var/opt/appliance/registry/data"


def test_derive_returns_new_settings_and_leaves_its_input_alone() -> None:
    given = RawSettings(
        registry_external_url="https://registry.corp.com",
        registry=RegistrySettings(http_addr="127.0.0.1:6000"),
        registry_nginx=RegistryNginxSettings(),
        letsencrypt=LetsEncryptSettings(),
    )
    before = dataclasses.replace(given)
    derived = derive(given, Path("/etc/appliance/appliance.yml"))
    assert given == before
    # The raw settings have no derived values at all (once: `paths is None`).
    assert not isinstance(given, Settings) and not hasattr(given, "paths")
    assert given.registry_nginx.listen_port is None
    assert given.letsencrypt.enable is None and given.registry.storage_path is None
    assert derived is not given and derived.registry is not given.registry
    assert derived.registry_nginx.listen_port == 443
    with pytest.raises(dataclasses.FrozenInstanceError):
        derived.root = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        derived.registry.enable = False  # type: ignore[misc]


def optional_fields(cls: type, prefix: str = "") -> set[str]:
    """Key paths of `cls` whose type admits None, sections walked."""
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= optional_fields(tp, f"{prefix}{f.name}.")
        elif type(None) in typing.get_args(tp):
            out.add(f"{prefix}{f.name}")
    return out


def test_resolved_settings_leave_optional_only_what_the_services_may_go_without() -> None:
    """Every value derive() fills in is typed without None in what the recipes read, so
    none of them asserts or falls back to a default of its own."""
    assert optional_fields(RawSettings) >= {
        "registry_external_url",
        "registry.storage_path",
        "registry.key_path",
        "registry_nginx.listen_port",
        "registry_nginx.ssl_certificate",
        "registry_nginx.ssl_certificate_key",
        "auth.enable",
        "auth.database_path",
        "letsencrypt.enable",
    }
    assert optional_fields(Settings) == {
        "initial_root_password",
        "registry.debug_addr",
        "registry.internal_key",
        "letsencrypt.ca_bundle",
        # A retention policy's rules are each optional (appliance/retention.py).
        "retention.default.keep_last",
        "retention.default.older_than",
        "retention.default.pulled_within",
        "retention.default.max_delete",
        "redis.url",
        "redis.password_file",
        # unset: the auth data on SQLite; set: on PostgreSQL (with or without a password)
        "auth.database_url",
        "auth.database_password_file",
    }


@pytest.mark.parametrize(("config", "expected"), list(DERIVATIONS.values()), ids=list(DERIVATIONS))
def test_derived_values_are_never_none(tmp_path: Path, config: dict, expected: dict) -> None:
    derived = load(tmp_path, config)
    for key in optional_fields(RawSettings) - optional_fields(Settings):
        assert attribute(derived, key) is not None, key


def test_host_facts_are_read_by_load_and_derive_reads_none(tmp_path: Path) -> None:
    raw = RawSettings(root=str(tmp_path))
    present = tmp_path / "appliance.yml"
    present.write_text("{}\n")
    assert derive(raw, present).facts == HostFacts()  # told nothing, it assumes nothing
    facts = HostFacts(run_as_root=True, registry_binary="/opt/registry", config_file_present=True)
    assert derive(raw, present, facts).facts == facts
    loaded = settings.load(present)
    assert loaded.facts.run_as_root is (os.geteuid() == 0)
    assert loaded.facts.config_file_present is True
    installed = [b for b in settings.REGISTRY_BINARIES if Path(b).exists()]
    assert loaded.facts.registry_binary == (installed or settings.REGISTRY_BINARIES)[0]
    assert settings.load(tmp_path / "absent.yml").facts.config_file_present is False
    # Facts are about the host, not the config: equal configs are equal settings.
    assert loaded == dataclasses.replace(loaded, facts=HostFacts())


# ---------------------------------------------------------------- example config


def schema_tree(cls: type) -> dict:
    """The key tree of the schema: {key: subtree or None}, derived fields left out."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: schema_tree(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None
        for f in dataclasses.fields(cls)
        if not f.metadata.get("derived")
    }


def key_tree(data: dict) -> dict:
    return {
        k: key_tree(v) if isinstance(v, dict) and k != "storage" and k != "env" else None
        for k, v in data.items()
    }


def uncomment(example: str) -> str:
    """What an admin gets by removing one '# ' from every setting line.

    The header (up to the first blank line) is prose; doc lines are `## ...` at the top
    level and `#   # ...` inside sections, so they stay comments after one '# ' goes;
    examples are `#   # for example:` blocks and likewise stay commented.
    """
    lines = example.splitlines()
    body = lines[lines.index("") :]
    return "\n".join(line[2:] if line.startswith("# ") else line for line in body) + "\n"


def test_uncommented_example_config_is_the_defaults(tmp_path: Path) -> None:
    text = uncomment(example_config())
    data = yaml.safe_load(text)
    from_example = load_text(tmp_path, text)
    defaults = settings.load(tmp_path / "appliance.yml.absent")
    assert dataclasses.replace(from_example, paths=None) == dataclasses.replace(
        defaults, paths=None
    )
    assert key_tree(data) == schema_tree(Settings)


def test_example_config_documents_every_key_and_its_examples_are_valid(tmp_path: Path) -> None:
    text = example_config()
    # Every example block, uncommented in place of its default, must itself load.
    examples = re.findall(r"^# (\s*)# for example:\n((?:# \1#   .*\n)+)", text, re.M)
    assert len(examples) >= 5

    def with_examples(cls: type) -> dict:
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints.get(f.name)):
                inner = with_examples(hints[f.name])
                if inner:
                    out[f.name] = inner
            elif f.metadata.get("example") is not None:
                out[f.name] = f.metadata["example"]
        return out

    config = with_examples(RawSettings)  # the schema
    documented = {}
    for indent, block in examples:
        documented.update(
            yaml.safe_load("\n".join(line[len(f"# {indent}#   ") :] for line in block.splitlines()))
        )
    assert len(documented) == len(examples)
    flat = {
        **config,
        **config.get("registry", {}),
        **config.get("letsencrypt", {}),
        **config.get("retention", {}).get("default", {}),
        **config.get("redis", {}),
    }
    assert {k: flat[k] for k in documented} == documented
    # registry_external_url example is its own domain on 443: the vhost and nginx.http_port
    # must not clash, and the s3 example must satisfy its driver's required keys.
    load(tmp_path, config)


# ---------------------------------------------------------------- show-config


def test_show_config_masks_secrets(tmp_path: Path) -> None:
    key = pki.generate_private_key("ec-p256").decode()
    derived = load(
        tmp_path,
        {
            "initial_root_password": "correct-horse-battery",
            "registry": {
                "internal_key": key,
                "storage": {
                    "s3": {
                        **S3,
                        "accesskey": "AKIAEXAMPLE",
                        "secretkey": "s3-secret-value",
                        "sessiontoken": "session-456",
                    }
                },
                "notifications": [
                    {
                        "name": "hook",
                        "url": "https://h.corp.com",
                        "headers": {
                            "Authorization": ["Bearer tok-123"],
                            "X-Api-Key": ["api-key-789"],
                            "Content-Type": ["application/json"],
                        },
                    }
                ],
                "env": {
                    "REGISTRY_HTTP_SECRET": "http-secret-000",
                    "REGISTRY_HTTP_RELATIVEURLS": True,
                },
            },
        },
    )
    shown = settings.to_yaml(derived)
    for secret in (
        "correct-horse-battery",
        "PRIVATE KEY",
        "s3-secret-value",
        "tok-123",
        "session-456",
        "api-key-789",
        "http-secret-000",
    ):
        assert secret not in shown
    data = yaml.safe_load(shown)
    assert data["initial_root_password"] == "********"
    assert data["registry"]["internal_key"] == "********"
    assert data["registry"]["storage"]["s3"]["secretkey"] == "********"
    assert data["registry"]["notifications"][0]["headers"]["Authorization"] == ["********"]
    assert data["registry"]["env"]["REGISTRY_HTTP_SECRET"] == "********"
    # Not secret, and shown: an admin checks these with show-config.
    assert data["registry"]["storage"]["s3"]["accesskey"] == "AKIAEXAMPLE"
    assert data["registry"]["env"]["REGISTRY_HTTP_RELATIVEURLS"] is True
    assert data["registry"]["notifications"][0]["headers"]["Content-Type"] == ["application/json"]
    assert data["registry_external_url"] == "https://localhost:5050"
    assert data["paths"]["secrets_file"] == "/etc/appliance/appliance-secrets.json"
    # Unset secrets are shown as unset, not as a mask that suggests a value.
    assert yaml.safe_load(settings.to_yaml(load(tmp_path, {})))["initial_root_password"] is None


def masked_pairs(shown: object, real: object) -> list[object]:
    """The real values at every place show-config prints the mask."""
    if isinstance(shown, dict):
        return [v for k in shown for v in masked_pairs(shown[k], real[k])]
    if isinstance(shown, list):
        return [v for s, r in zip(shown, real, strict=True) for v in masked_pairs(s, r)]
    return [real] if shown == "********" else []


def test_the_engine_masks_exactly_what_show_config_masks(tmp_path: Path) -> None:
    """One sensitivity rule: sensitive_values (fed to the engine and the run log) is the
    set of values show-config hides."""
    derived = load(
        tmp_path,
        {
            "initial_root_password": "correct-horse-battery",
            "registry": {
                "storage": {
                    "azure": {"accountname": "acct", "accountkey": "azure-key-1", "container": "c"}
                },
                "notifications": [
                    {
                        "name": "hook",
                        "url": "https://h.corp.com",
                        "headers": {
                            "Authorization": ["Bearer tok-123"],
                            "Content-Type": ["application/json"],
                        },
                    }
                ],
                "env": {"REGISTRY_HTTP_SECRET": "http-secret-000", "GOGC": 400},
            },
        },
    )
    hidden = masked_pairs(settings.as_dict(derived), settings.as_dict(derived, mask=False))
    assert sorted(map(str, hidden)) == sorted(settings.sensitive_values(derived))
    assert sorted(settings.sensitive_values(derived)) == sorted(
        ["correct-horse-battery", "azure-key-1", "Bearer tok-123", "http-secret-000"]
    )
