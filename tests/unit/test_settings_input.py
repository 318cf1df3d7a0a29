"""Hostile and malformed appliance.yml files: every one is refused with a sentence.

Each case is checked twice: by the validator (the exact message and problems) and by
`appliance-ctl reconfigure -c FILE` as an admin runs it (exit 2, no traceback, and
nothing created beside the file). The bounds are what keep a small file from costing
gigabytes: an alias bomb expands to a billion values only when walked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance import settings
from appliance.errors import ConfigError

CTL = Path(sys.prefix) / "bin/appliance-ctl"
PORT_MSG = "is not host:port with a port 1-65535"
ZONE_MSG = (
    "is not an address without an IPv6 zone ID: nginx, the registry and gunicorn "
    "take no '%eth0'; use the interface's own address"
)
URL_MSG = "is not a URL without spaces, quotes, ';', '{', '}' or '$'"
TOO_BIG = "which no appliance.yml needs; is it the right file?"
DRIVERS = "filesystem, s3, azure, gcs, swift, oss, inmemory"

ALIAS_BOMB = (
    b"".join(
        b"%s: &%s [%s]\n"
        % (
            name,
            name,
            b",".join([b"*" + previous] * 10) if previous else b",".join([b'"lol"'] * 10),
        )
        for previous, name in zip(
            [b""] + [bytes([c]) for c in b"abcdefgh"],
            [bytes([c]) for c in b"abcdefghi"],
            strict=True,
        )
    )
    + b"registry:\n  storage: *i\n"
)

# name -> (file content, the error's sentence after "<path>: ", its list of problems)
HOSTILE = {
    "alias bomb (billion laughs)": (
        ALIAS_BOMB,
        f"more than 50000 values once its aliases are expanded, {TOO_BIG}",
        [],
    ),
    "alias inside itself": (
        b"registry: &r\n  storage: *r\n",
        f"the value at line 1 contains an alias to itself, {TOO_BIG}",
        [],
    ),
    "nested 40 deep": (
        b"registry:\n  storage: " + b"[" * 40 + b"]" * 40 + b"\n",
        f"nested more than 32 levels deep at line 2, {TOO_BIG}",
        [],
    ),
    "50 MB file": (None, f"larger than 1 MiB, {TOO_BIG}", []),
    "binary file": (
        bytes(range(256)) * 4,
        "not UTF-8 text (byte 0x80 at line 2); save it as UTF-8.",
        [],
    ),
    "NUL bytes": (
        b"root: /srv\x00\n",
        "not a text file (character #x0000 at line 1); appliance.yml is YAML text.",
        [],
    ),
    "Latin-1 file": (
        "external_url: https://café.example.com\n".encode("latin-1"),
        "not UTF-8 text (byte 0xe9 at line 1); save it as UTF-8.",
        [],
    ),
    "lone surrogate escape": (
        b'root: "/srv/\\ud800"\n',
        "not valid YAML at line 1, column 7: a \\u escape that is no character (a lone surrogate).",
        [],
    ),
    "5000-digit number": (
        b"auth:\n  workers: " + b"9" * 5000 + b"\n",
        "not valid YAML at line 2, column 12: cannot read this value (Exceeds the limit "
        "(4300 digits) for integer string conversion: value has 5000 di).",
        [],
    ),
    "date that does not exist": (
        b"root: 2024-13-45\n",
        "not valid YAML at line 1, column 7: cannot read this value (month must be in 1..12).",
        [],
    ),
    "port with a superscript digit": (
        "registry:\n  http_addr: 127.0.0.1:500²\n".encode(),
        None,
        [f'registry.http_addr: "127.0.0.1:500²" {PORT_MSG}'],
    ),
    "port in Arabic-Indic digits": (
        "auth:\n  listen_addr: 127.0.0.1:٥١٠٠\n".encode(),
        None,
        [f'auth.listen_addr: "127.0.0.1:٥١٠٠" {PORT_MSG}'],
    ),
    "unclosed IPv6 URL": (
        b'external_url: "https://[::1"\n',
        None,
        ['external_url: "https://[::1" is not a URL whose host is a valid host name'],
    ),
    "storage driver key a number": (
        b"registry:\n  storage:\n    1: {}\n",
        None,
        [f"registry.storage.1: unknown storage driver; drivers: {DRIVERS}"],
    ),
    "storage driver key null": (
        b"registry:\n  storage:\n    null: {}\n",
        None,
        [f"registry.storage.None: unknown storage driver; drivers: {DRIVERS}"],
    ),
    "driver parameter key a number": (
        b"registry:\n  storage:\n    s3: {bucket: b, region: r, 5: x}\n",
        None,
        ["registry.storage.s3: parameter names must be strings"],
    ),
    "filesystem rootdirectory a number": (
        b"registry:\n  storage:\n    filesystem: {rootdirectory: 5}\n",
        None,
        [
            "registry.storage.filesystem.rootdirectory: 5 is not an absolute path without spaces, "
            "quotes or shell characters"
        ],
    ),
    "filesystem rootdirectory relative": (
        b"registry:\n  storage:\n    filesystem: {rootdirectory: images}\n",
        None,
        [
            'registry.storage.filesystem.rootdirectory: "images" is not an absolute path without '
            "spaces, quotes or shell characters"
        ],
    ),
    "storage cache a number": (
        b"registry:\n  storage:\n    cache: 5\n",
        None,
        ["registry.storage.cache: expected a mapping, as in the registry's own config"],
    ),
    "notification ignore and disabled malformed": (
        b"registry:\n  notifications:\n  - {name: a, url: 'http://127.0.0.1:1/', ignore: 5,"
        b" ignoredmediatypes: x, disabled: 'no'}\n",
        None,
        [
            "registry.notifications[0].disabled: true or false",
            "registry.notifications[0].ignoredmediatypes: a list of media types",
            "registry.notifications[0].ignore: a mapping with mediatypes and actions, each a list "
            "of strings, e.g. {actions: [pull]}",
        ],
    ),
    "notification name a list": (
        b"registry:\n  notifications:\n  - {name: [a], url: 'http://127.0.0.1:1/'}\n"
        b"  - {name: [a], url: 'http://127.0.0.1:1/'}\n",
        None,
        [
            "registry.notifications[0].name: ['a'] is not a string",
            "registry.notifications[1].name: ['a'] is not a string",
        ],
    ),
    "notification timeout a number": (
        b"registry:\n  notifications:\n  - {name: a, url: 'http://127.0.0.1:1/', "
        b"timeout: 5, threshold: true}\n",
        None,
        [
            "registry.notifications[0].timeout: 5 is not a duration such as 500ms, 1s or 5m",
            "registry.notifications[0].threshold: a whole number of failures, at least 1",
        ],
    ),
    "header name a number": (
        b"registry:\n  notifications:\n  - {name: a, url: 'http://127.0.0.1:1/', "
        b"headers: {1: [x]}}\n",
        None,
        [
            "registry.notifications[0].headers: a mapping of header name to a list of strings, "
            'e.g. {Authorization: ["Bearer TOKEN"]}'
        ],
    ),
    "NUL byte in root": (
        b'root: "/srv/a\\0b"\n',
        None,
        [
            "root: \"/srv/a\\u0000b\" is not a path without spaces, quotes, ';', '{', '}', "
            "'$', '#' or backslashes"
        ],
    ),
    "listen address with a zone ID": (
        b'nginx:\n  listen_addresses: ["::1%lo"]\n',
        None,
        [f'nginx.listen_addresses[0]: "::1%lo" {ZONE_MSG}'],
    ),
    "http_addr with a zone ID": (
        b'registry:\n  http_addr: "[::1%x]:5000"\n',
        None,
        [f'registry.http_addr: "[::1%x]:5000" {ZONE_MSG}'],
    ),
    "IPv6 host:port without brackets": (
        b'registry:\n  http_addr: "::1:5000"\n',
        None,
        [f'registry.http_addr: "::1:5000" {PORT_MSG}'],
    ),
    "IPv4 in brackets as a listen address": (
        b'nginx:\n  listen_addresses: ["[127.0.0.1]"]\n',
        None,
        ["nginx.listen_addresses[0]: \"[127.0.0.1]\" is not an IP address, '*' or '[::]'"],
    ),
    "host:port whose host is digits but no address": (
        b'registry:\n  http_addr: "127.1:5000"\n',
        None,
        [f'registry.http_addr: "127.1:5000" {PORT_MSG}'],
    ),
    "host:port with a trailing newline": (
        b'auth:\n  listen_addr: "127.0.0.1:5100\\n"\n',
        None,
        [f'auth.listen_addr: "127.0.0.1:5100\\n" {PORT_MSG}'],
    ),
    "worker_processes in Arabic-Indic digits": (
        "nginx:\n  worker_processes: '٣'\n".encode(),
        None,
        ["nginx.worker_processes: \"٣\" is not 'auto' or a number"],
    ),
    "env name with a trailing newline": (
        b'registry:\n  env: {"FOO\\n": x}\n',
        None,
        ['registry.env."FOO\\n": not an environment variable name (A-Z, 0-9, _)'],
    ),
    "env value with a NUL": (
        b'registry:\n  env: {FOO: "a\\0b"}\n',
        None,
        ["registry.env.FOO: a single-line string, number or boolean"],
    ),
    "a long unknown key": (
        b"x" * 1000 + b": 1\n",
        None,
        [
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...: unknown key; valid "
            "keys here: auth, default_projects_features, external_url, initial_root_password, "
            "janitor, letsencrypt, logging, manage_accounts, nginx, redis, registry, "
            "registry_external_url, registry_nginx, retention, root, web_server"
        ],
    ),
    "a long value in a message": (
        b"external_url: https://" + b"a" * 900000 + b".com/x;y\n",
        None,
        ['external_url: "https://' + "a" * 68 + '..." ' + URL_MSG],
    ),
    "a section that is a long list": (
        b"nginx: [" + b"1," * 20000 + b"1]\n",
        None,
        ["nginx: expected a mapping of keys, got [1, 1, 1, 1, ...]"],
    ),
}


def write(path: Path, content: bytes | None) -> None:
    if content is None:  # 50 MB, sparse: the size is what counts
        with open(path, "wb") as handle:
            handle.truncate(50 * 1024 * 1024)
    else:
        path.write_bytes(content)


def expected_message(path: Path, sentence: str | None, problems: list[str]) -> str:
    if sentence is None:
        count = len(problems)
        sentence = f"{count} problem{'s' * (count > 1)} found; nothing was changed."
    return f"{path}: {sentence}"


@pytest.mark.parametrize(
    ("content", "sentence", "problems"), list(HOSTILE.values()), ids=list(HOSTILE)
)
def test_the_validator_refuses_it_with_a_sentence(
    tmp_path: Path, content: bytes | None, sentence: str | None, problems: list[str]
) -> None:
    path = tmp_path / "appliance.yml"
    write(path, content)
    with pytest.raises(ConfigError) as caught:
        settings.load(path, must_exist=True)
    assert str(caught.value) == expected_message(path, sentence, problems)
    assert caught.value.problems == problems


@pytest.mark.parametrize(
    ("content", "sentence", "problems"), list(HOSTILE.values()), ids=list(HOSTILE)
)
def test_reconfigure_exits_2_and_touches_nothing(
    tmp_path: Path, content: bytes | None, sentence: str | None, problems: list[str]
) -> None:
    path = tmp_path / "appliance.yml"
    write(path, content)
    environment = {k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"}
    result = subprocess.run(
        [str(CTL), "-c", str(path), "reconfigure"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"appliance-ctl: {expected_message(path, sentence, problems)}"
    assert lines[1:] == [f"  - {problem}" for problem in problems]
    assert sorted(os.listdir(tmp_path)) == ["appliance.yml"]


# nginx's, Go's and gunicorn's grammar, accepted as each of them takes it.
GOOD_ADDRESSES = {
    "registry": {"http_addr": "[::1]:5000", "debug_addr": "localhost:5001"},
    "auth": {"listen_addr": "127.0.0.1:05100"},
    "nginx": {"listen_addresses": ["127.0.0.1", "::1", "[::1]", "*", "[::]"]},
}


def test_addresses_in_the_consumers_grammar_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "appliance.yml"
    path.write_text(yaml.safe_dump(GOOD_ADDRESSES))
    loaded = settings.load(path, must_exist=True)
    assert loaded.registry.http_addr == "[::1]:5000"
    assert loaded.nginx.listen_addresses == ["127.0.0.1", "::1", "[::1]", "*", "[::]"]


def test_a_file_just_within_the_bounds_loads(tmp_path: Path) -> None:
    """The bounds refuse bombs, not big honest files: 40,000 values, 1 MiB less a little."""
    env = "".join(f"    REGISTRY_X{i}: value-{i:07d}\n" for i in range(19990))
    text = "registry:\n  env:\n" + env
    text += "#" * (settings.MAX_CONFIG_BYTES - len(text) - 1) + "\n"
    path = tmp_path / "appliance.yml"
    path.write_text(text)
    assert len(settings.load(path, must_exist=True).registry.env) == 19990
