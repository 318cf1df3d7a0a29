"""The key rotation's run, as the recipes build it: which files each step writes and
which service each notifies (the registry before the auth service), and what is refused
before anything is read."""

from __future__ import annotations

from pathlib import Path

import pytest

import recipes
from appliance import pki
from appliance.errors import ConfigError
from appliance.secrets import begin_rotation, load_or_generate
from recipes import rotation
from tests.support.recipes import settings_for


def steps(settings) -> tuple[list, list]:
    run = recipes.rotate_token_key(settings)
    secrets = run.secrets()
    return list(run.resources(secrets)), list(run.late_resources(secrets))


def table(resources: list, root: Path) -> list[tuple[str, list[str]]]:
    return [
        (
            str(Path(r.name).relative_to(root)),
            [f"{n.action} {n.service}" for n in r.notifies],
        )
        for r in resources
    ]


def saved(root: Path, settings) -> None:
    path = settings.paths.secrets_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(load_or_generate(path).to_json())


def test_the_registry_trusts_the_new_key_before_the_auth_service_signs_with_it(tmp_path):
    settings = settings_for(tmp_path)
    saved(tmp_path, settings)
    first, second = steps(settings)
    assert table(first, tmp_path) == [
        ("etc/appliance/appliance-secrets.json", []),
        ("var/opt/appliance/registry/token-bundle.crt", ["reload registry"]),
        ("var/opt/appliance/auth/token-signing.crt", ["reload auth"]),
    ]
    assert table(second, tmp_path) == [
        ("etc/appliance/appliance-secrets.json", []),
        ("var/opt/appliance/auth/token-signing.crt", ["reload auth"]),
        ("var/opt/appliance/auth/token-signing.key", ["reload auth"]),
    ]
    bundle, key = first[1].content, second[2].content
    # Step 2's key is one the bundle of step 1 already trusts; the token service's
    # certificate file holds the same certificates (the tag rules verify with them).
    assert bundle.count(b"BEGIN CERTIFICATE") == 2
    assert first[2].content == bundle == second[1].content
    newest = bundle[bundle.index(b"-----END CERTIFICATE-----") + 26 :]
    assert pki.public_key_matches(newest, key)


def test_for_an_external_registry_step_one_is_the_bundle_to_copy_and_stops(tmp_path):
    settings = settings_for(tmp_path, registry={"enable": False}, auth={"enable": True})
    saved(tmp_path, settings)
    first, second = steps(settings)
    assert table(first, tmp_path) == [
        ("etc/appliance/appliance-secrets.json", []),
        ("var/opt/appliance/auth/token-signing.crt", ["reload auth"]),
    ]
    assert first[1].content.count(b"BEGIN CERTIFICATE") == 2
    assert second == []  # until --continue


def test_a_provided_key_is_not_rotated(tmp_path):
    key = pki.generate_private_key("ec-p256").decode()
    settings = settings_for(tmp_path, registry={"internal_key": key})
    saved(tmp_path, settings)
    with pytest.raises(ConfigError) as refused:
        rotation.preflight(settings)
    assert str(refused.value).startswith(
        "registry.internal_key is set in appliance.yml: the token service signs with the "
        "key you provide, which the appliance does not replace;"
    )


def test_before_the_first_reconfigure_there_is_nothing_to_rotate(tmp_path):
    settings = settings_for(tmp_path)
    with pytest.raises(Exception, match="does not exist: run appliance-ctl reconfigure first"):
        rotation.preflight(settings)


def test_continue_without_an_external_rotation_waiting_is_refused(tmp_path):
    settings = settings_for(tmp_path)
    saved(tmp_path, settings)
    with pytest.raises(ConfigError, match="no rotation waiting for an external registry"):
        recipes.rotate_token_key(settings, resume_external=True).secrets()


def test_a_rotation_under_way_is_resumed_with_its_own_new_key(tmp_path):
    settings = settings_for(tmp_path)
    saved(tmp_path, settings)
    path = settings.paths.secrets_file
    rotating = begin_rotation(load_or_generate(path), "ec-p256", "appliance-issuer")
    path.write_text(rotating.to_json())
    assert recipes.rotate_token_key(settings).secrets() == rotating
