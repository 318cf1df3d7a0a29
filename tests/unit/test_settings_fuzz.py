"""Property: whatever appliance.yml holds, the validator answers with settings or a
ConfigError, and settings it accepts render into every resource without an exception.

Generated configs mix the schema's real keys with values of every YAML type, values
close to valid ones (ports in other digits, zone IDs, unclosed IPv6 URLs, NUL bytes),
and unknown keys, so most examples reach deep into the cross-checks and many pass
validation and go on to derive() and the recipes. A failure here is an input that
reaches a traceback (issue 17.6) or a host file (17.7).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import recipes
from appliance import settings
from appliance.errors import ConfigError
from tests.support.recipes import SECRETS

# Values near the grammar's edges: the ones a hand-written table would list.
NEAR_VALID = [
    "*",
    "[::]",
    "::1",
    "[::1]",
    "::1%lo",
    "[::1%x]:5000",
    "127.0.0.1",
    "[127.0.0.1]",
    "127.0.0.1:5000",
    "localhost:5001",
    "[::1]:5000",
    "::1:5000",
    "127.0.0.1:500²",
    "127.0.0.1:٥٠٠٠",
    "127.0.0.1:0",
    "127.0.0.1:65536",
    "127.0.0.1:5000\n",
    "https://registry.example.com",
    "https://localhost:5050",
    "https://[::1",
    "https://[::1]",
    "http://127.0.0.1:9000",
    "https://example.com/path",
    "https://ex ample.com",
    "/srv/registry",
    "/srv/a\x00b",
    "relative/path",
    "/srv/a b",
    "auto",
    "٣",
    "4",
    "500ms",
    "1s",
    "5m",
    "1x",
    "ec-p256",
    "rsa-4096",
    "TLSv1.2 TLSv1.3",
    "tcp",
    "unix",
    "info",
    "admin@example.com",
    "appliance-registry",
    "Bearer TOKEN",
    "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n",
    "'quoted'",
    '"',
    "",
    "%",
]
DRIVER_KEYS = [*settings.STORAGE_DRIVERS, *settings.STORAGE_EXTRAS]
DRIVER_PARAMS = sorted(
    {p for ps in settings.STORAGE_DRIVERS.values() for p in ps}
    | {"regionendpoint", "chunksize", "rootdirectory", "disable"}
)
PARAMS_OF = {
    "filesystem": ["rootdirectory", "maxthreads"],
    "s3": ["regionendpoint", "chunksize"],
    "redirect": ["disable"],
    "maintenance": ["readonly", "uploadpurging"],
    "delete": ["enabled"],
    "cache": ["blobdescriptor"],
}
ENDPOINT_KEYS = [
    "name",
    "url",
    "headers",
    "timeout",
    "threshold",
    "backoff",
    "disabled",
    "ignoredmediatypes",
    "ignore",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 70000),
    st.integers(),
    st.floats(allow_nan=True),
    st.sampled_from(NEAR_VALID),
    st.text(max_size=12),
)
keys = st.one_of(st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=8,
)


def mapping(known: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Some of the known keys with their strategies, plus now and then a random key."""
    return st.tuples(
        st.fixed_dictionaries({}, optional=known), st.dictionaries(keys, anything, max_size=1)
    ).map(lambda pair: {**pair[1], **pair[0]})


# A driver with its required parameters (so it often passes) plus a few others.
driver = st.sampled_from(DRIVER_KEYS).flatmap(
    lambda name: st.tuples(
        st.just(name),
        st.tuples(
            st.fixed_dictionaries(
                {p: st.sampled_from(["b", "r"]) for p in settings.STORAGE_DRIVERS.get(name, ())}
            ),
            st.dictionaries(
                st.one_of(
                    st.sampled_from(PARAMS_OF.get(name, DRIVER_PARAMS)),
                    st.sampled_from(DRIVER_PARAMS),
                    keys,
                ),
                st.one_of(st.sampled_from(NEAR_VALID), scalars, anything),
                max_size=3,
            ),
        ).map(lambda pair: {**pair[0], **pair[1]}),
    )
)
storage = st.lists(
    st.one_of(driver, driver, st.tuples(keys, anything)), min_size=1, max_size=3
).map(dict)
endpoint = mapping(
    {
        "name": st.one_of(st.sampled_from(["a", "b"]), anything),
        "url": st.one_of(st.sampled_from(NEAR_VALID), anything),
        "headers": st.one_of(
            st.dictionaries(
                st.one_of(st.sampled_from(["Authorization"]), keys),
                st.one_of(st.lists(st.text(max_size=6), max_size=2), anything),
                max_size=2,
            ),
            anything,
        ),
        **{k: st.one_of(scalars, anything) for k in ENDPOINT_KEYS[3:]},
    }
)
SPECIAL = {
    ("registry", "storage"): st.one_of(storage, anything),
    ("registry", "notifications"): st.one_of(st.lists(endpoint, max_size=2), anything),
    ("registry", "env"): st.one_of(
        st.dictionaries(
            st.one_of(
                st.sampled_from(["REGISTRY_X", "GOGC", "REGISTRY_X_SECRET"]),
                st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True),
                keys,
            ),
            st.one_of(
                st.integers(),
                st.booleans(),
                st.text(max_size=12),
                st.sampled_from(NEAR_VALID),
                scalars,
            ),
            max_size=3,
        ),
        anything,
    ),
}


def schema(cls: type, section: str = "") -> st.SearchStrategy:
    """A strategy for one section of the schema: its keys with any kind of value, and
    lists of near-valid strings where the schema has lists."""
    hints = typing.get_type_hints(cls)
    known: dict[str, st.SearchStrategy] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            known[f.name] = st.one_of(schema(tp, f.name), scalars)
        elif (section, f.name) in SPECIAL:
            known[f.name] = SPECIAL[(section, f.name)]
        elif tp is list:
            known[f.name] = st.one_of(st.lists(scalars, max_size=3), anything)
        else:
            known[f.name] = st.one_of(scalars, anything)
    known.pop("root", None)  # every run stays under its own temporary root
    return mapping(known)


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], st.SearchStrategy]:
    """Every key path of the schema with a strategy for its value."""
    hints = typing.get_type_hints(cls)
    out: dict[tuple[str, ...], st.SearchStrategy] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived") or f.name == "root":
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(leaves(tp, (*prefix, f.name)))
        else:
            if (*prefix, f.name) in SPECIAL:
                out[(*prefix, f.name)] = SPECIAL[(*prefix, f.name)]
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            typed = st.one_of(st.just(default), of_type(tp))
            # mostly the right type, so that many configs pass and reach the recipes
            out[(*prefix, f.name)] = st.one_of(typed, typed, typed, anything)
    return out


def of_type(tp: object) -> st.SearchStrategy:
    """Values of the schema type `tp` (None too where it is optional): valid or close."""
    args = set(typing.get_args(tp)) or {tp}
    options = [st.none()] if type(None) in args else []
    if bool in args:
        options.append(st.booleans())
    if int in args:
        options += [st.integers(1, 65535), st.integers()]
    if str in args:
        options.append(st.sampled_from(NEAR_VALID))
    if list in args:
        options.append(st.lists(st.sampled_from(NEAR_VALID), max_size=2))
    return st.one_of(options) if options else anything


LEAVES = leaves(settings.RawSettings)


def nest(changes: list[tuple[tuple[str, ...], object]]) -> dict:
    config: dict = {}
    for path, value in changes:
        where = config
        for key in path[:-1]:
            where = where.setdefault(key, {})
        where[path[-1]] = value
    return config


# A few keys changed from the defaults: most such configs are valid and reach the recipes.
# The free-form hashes are where the cross-checks live: drawn as often as all the rest.
mutations = st.lists(
    st.sampled_from(sorted(LEAVES) + [*SPECIAL] * 20).flatmap(
        lambda path: st.tuples(st.just(path), LEAVES[path])
    ),
    max_size=4,
).map(nest)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root for every example: only its appliance.yml is written, nothing else."""
    return tmp_path_factory.mktemp("fuzz")


def render_all(root: Path, config: dict) -> None:
    path = root / "appliance.yml"
    path.write_text(yaml.safe_dump({**config, "root": str(root)}, allow_unicode=True))
    try:
        loaded = settings.load(path, must_exist=True)
        settings.to_yaml(loaded)  # show-config
        recipes.preflight(loaded)
        resources = list(recipes.resources(loaded, SECRETS))
    except ConfigError:
        event("refused")
        return
    event("rendered")
    assert resources
    files_read_back(loaded, resources)


def files_read_back(loaded: settings.Settings, resources: list) -> None:
    """What the services read parses, and says what appliance.yml said: the registry's
    YAML config, the JSON auth config, the registry wrapper's environment."""
    for resource in resources:
        content = getattr(resource, "content", None)
        name = getattr(resource, "name", "")
        if content is None:
            continue
        if name.endswith((".yml", ".json")):
            parsed = yaml.safe_load(content)
            assert isinstance(parsed, dict), name
        if name.endswith("/registry/program.json"):
            # registry.env reaches the registry through its wrapper's program.json (beside
            # the appliance's own GOGC default, which registry.env may override).
            environment = json.loads(content)["environment"]
            expected = {
                k: str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in loaded.registry.env.items()
            }
            assert environment == {"GOGC": environment.get("GOGC"), **expected}
        if name == str(loaded.paths.registry_config):
            config = yaml.safe_load(content)
            assert config["http"].get("addr") in (
                loaded.registry.http_addr,
                str(loaded.paths.registry_socket),
            )


@hypothesis_settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(config=st.one_of(mutations, schema(settings.RawSettings)))
def test_any_config_validates_or_is_refused_and_valid_ones_render(root: Path, config: dict) -> None:
    render_all(root, config)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.binary(max_size=200),
        st.text(
            alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"\n #,?@%\t\\0\x00\x85é²")), max_size=80
        ).map(str.encode),
    )
)
def test_any_bytes_parse_or_are_refused_with_a_sentence(root: Path, text: bytes) -> None:
    path = root / "raw.yml"
    path.write_bytes(text)
    try:
        assert isinstance(settings.read_config(path, must_exist=True), dict)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ")
        assert "\n" not in str(exc)
