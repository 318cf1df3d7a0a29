"""The secrets file through a signing-key rotation: steady -> rotating -> rotated -> steady.

What the registry trusts (`trusted_certificates`) and what the auth service signs with
(`token_signing_key`) in each state, when the previous key is forgotten, and what is
refused with a sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import pki
from appliance.errors import ConfigError
from appliance.secrets import (
    Secrets,
    begin_rotation,
    complete_rotation,
    finish_rotation,
    format_time,
    load_or_generate,
    parse_time,
    trusted_until,
)

NOW = parse_time("2026-11-28T14:00:00Z")


def certificates(bundle: str) -> list[bytes]:
    return [
        c.public_bytes(serialization.Encoding.PEM)
        for c in x509.load_pem_x509_certificates(bundle.encode())
    ]


def pem(cert: str) -> bytes:
    return x509.load_pem_x509_certificate(cert.encode()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def steady(tmp_path: Path) -> tuple[Path, Secrets]:
    path = tmp_path / "appliance-secrets.json"
    secrets = load_or_generate(path, now=NOW)
    path.write_text(secrets.to_json())
    return path, secrets


def test_a_file_that_never_saw_a_rotation_keeps_its_fields_and_bytes(steady) -> None:
    path, secrets = steady
    assert not any(k.startswith(("next_", "previous_")) for k in json.loads(path.read_text()))
    assert load_or_generate(path, now=NOW).to_json() == path.read_text()
    assert certificates(secrets.trusted_certificates()) == [pem(secrets.token_signing_certificate)]


def test_the_three_states_of_a_rotation(steady) -> None:
    path, old = steady
    rotating = begin_rotation(old, "ec-p256", "appliance-issuer")
    # Rotating: the old key still signs, the registry trusts both.
    assert rotating.token_signing_key == old.token_signing_key
    assert rotating.rotating
    assert pki.public_key_matches(
        rotating.next_token_signing_certificate.encode(), rotating.next_token_signing_key.encode()
    )
    assert rotating.next_token_signing_key in rotating.private_values()
    assert certificates(rotating.trusted_certificates()) == [
        pem(old.token_signing_certificate),
        pem(rotating.next_token_signing_certificate),
    ]
    # Saved and read back (a run interrupted here): the same state, the same new key.
    path.write_text(rotating.to_json())
    assert load_or_generate(path, now=NOW) == rotating
    assert begin_rotation(load_or_generate(path, now=NOW), "ec-p256", "x") == rotating

    until = trusted_until(NOW, 300, 10)
    rotated = complete_rotation(rotating, until)
    assert rotated.token_signing_key == rotating.next_token_signing_key
    assert rotated.token_signing_certificate == rotating.next_token_signing_certificate
    assert not rotated.rotating and rotated.previous_trusted_until == until
    # The bundle is the same bytes in both states: the switch hands the registry over
    # no second time.
    assert rotated.trusted_certificates() == rotating.trusted_certificates()
    path.write_text(rotated.to_json())
    assert load_or_generate(path, now=until - 1) == rotated

    # The first load at or after the time forgets the previous certificate.
    steady_again = load_or_generate(path, now=until)
    assert steady_again.previous_token_signing_certificate == ""
    assert certificates(steady_again.trusted_certificates()) == [
        pem(rotated.token_signing_certificate)
    ]
    assert steady_again.token_signing_key == rotated.token_signing_key
    assert "previous_token_signing_certificate" not in json.loads(steady_again.to_json())


@pytest.mark.parametrize(
    ("lifetime", "grace", "expected"),
    [
        (300, 10, "2026-11-28T14:07:00Z"),  # 14:06:10 rounded up to the minute
        (60, 0, "2026-11-28T14:02:00Z"),  # on the minute: not one more
        (3600, 10, "2026-11-28T15:02:00Z"),
    ],
)
def test_the_old_key_is_trusted_for_a_token_lifetime_plus_the_registry_leeway(
    lifetime: int, grace: int, expected: str
) -> None:
    assert format_time(trusted_until(NOW, lifetime, grace)) == expected


def test_a_second_rotation_before_the_first_is_finished_is_refused(steady) -> None:
    _, old = steady
    rotated = complete_rotation(begin_rotation(old, "ec-p256", "i"), trusted_until(NOW, 300, 10))
    with pytest.raises(ConfigError) as refused:
        begin_rotation(rotated, "ec-p256", "i")
    assert str(refused.value) == (
        "The previous signing key is still trusted until 2026-11-28T14:07:00Z (the last "
        "rotation is not finished); rotate again after that time, or drop it now with "
        "appliance-ctl rotate-token-key --finish --force."
    )


def test_finish_refuses_before_the_time_unless_forced(steady) -> None:
    _, old = steady
    until = trusted_until(NOW, 300, 10)
    rotated = complete_rotation(begin_rotation(old, "ec-p256", "i"), until)
    with pytest.raises(ConfigError, match="stays trusted until 2026-11-28T14:07:00Z.*--force"):
        finish_rotation(rotated, NOW, force=False)
    for finished in (
        finish_rotation(rotated, NOW, force=True),
        finish_rotation(rotated, until, False),
    ):
        assert finished.previous_token_signing_certificate == ""
        assert finished.trusted_certificates() == rotated.token_signing_certificate


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("steady", "There is no previous signing key to drop"),
        ("rotating", "A rotation is under way"),
    ],
)
def test_finish_refuses_when_there_is_nothing_to_finish(steady, state: str, message: str) -> None:
    _, old = steady
    secrets = old if state == "steady" else begin_rotation(old, "ec-p256", "i")
    with pytest.raises(ConfigError, match=message):
        finish_rotation(secrets, NOW, force=True)


def test_the_new_key_has_the_configured_type(steady) -> None:
    _, old = steady
    rotating = begin_rotation(old, "rsa-2048", "corp-issuer")
    assert "BEGIN PRIVATE KEY" in rotating.next_token_signing_key
    info = pki.certificate_info(rotating.next_token_signing_certificate.encode())
    assert info.subject.endswith("corp-issuer")


def test_a_damaged_drop_time_is_named(steady) -> None:
    path, old = steady
    stored = json.loads(old.to_json())
    stored["previous_token_signing_certificate"] = old.token_signing_certificate
    stored["previous_token_signing_trusted_until"] = "tomorrow"
    path.write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="previous_token_signing_trusted_until .* 'tomorrow'"):
        load_or_generate(path, now=NOW)
