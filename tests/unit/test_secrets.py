"""appliance-secrets.json: generated once, reused forever, certificate always matches the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import pki
from appliance.errors import ConfigError
from appliance.secrets import Secrets, load_or_generate

FIELDS = {
    "token_signing_key",
    "token_signing_certificate",
    "registry_http_secret",
    "auth_secret",
    "letsencrypt_account_key",
    "token_signing_pair_digest",
    "registry_events_secret",
}


def save(path: Path, secrets: Secrets) -> None:
    """What the base recipe does with them (a sensitive File resource)."""
    path.write_text(secrets.to_json())


def test_generated_once_then_the_same_bytes(tmp_path: Path) -> None:
    path = tmp_path / "appliance-secrets.json"
    first = load_or_generate(path)
    assert set(json.loads(first.to_json())) == FIELDS
    assert all(json.loads(first.to_json()).values())
    assert pki.public_key_matches(
        first.token_signing_certificate.encode(), first.token_signing_key.encode()
    )
    save(path, first)
    written = path.read_bytes()
    for _ in range(2):
        again = load_or_generate(path)
        assert again == first
        assert again.to_json().encode() == written  # so the File resource stays up to date


def test_nothing_saved_means_new_values_each_time(tmp_path: Path) -> None:
    # The file is what makes them stable: two loads without it share nothing.
    one, two = load_or_generate(tmp_path / "s.json"), load_or_generate(tmp_path / "s.json")
    assert one.registry_http_secret != two.registry_http_secret
    assert one.token_signing_key != two.token_signing_key


def test_a_missing_value_is_generated_and_the_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "appliance-secrets.json"
    first = load_or_generate(path)
    stored = json.loads(first.to_json())
    del stored["auth_secret"]  # a file from an older version
    path.write_text(json.dumps(stored))
    upgraded = load_or_generate(path)
    assert upgraded.auth_secret and len(upgraded.auth_secret) == 64
    assert upgraded.token_signing_key == first.token_signing_key
    assert upgraded.token_signing_certificate == first.token_signing_certificate
    assert upgraded.registry_http_secret == first.registry_http_secret


def test_key_type_of_a_generated_key(tmp_path: Path) -> None:
    secrets = load_or_generate(tmp_path / "s.json", key_type="rsa-2048")
    assert "BEGIN PRIVATE KEY" in secrets.token_signing_key
    info = pki.certificate_info(secrets.token_signing_certificate.encode())
    assert info.subject.endswith("appliance-issuer")


def test_internal_key_is_used_and_certified(tmp_path: Path) -> None:
    path = tmp_path / "appliance-secrets.json"
    key = pki.generate_private_key("ec-p256").decode()
    secrets = load_or_generate(path, internal_key=key, issuer="corp-issuer")
    assert secrets.token_signing_key == key
    assert pki.public_key_matches(secrets.token_signing_certificate.encode(), key.encode())
    assert "corp-issuer" in pki.certificate_info(secrets.token_signing_certificate.encode()).subject
    save(path, secrets)
    assert load_or_generate(path, internal_key=key) == secrets  # same key: same certificate


def test_a_changed_internal_key_regenerates_only_the_certificate(tmp_path: Path) -> None:
    path = tmp_path / "appliance-secrets.json"
    first = load_or_generate(path)
    save(path, first)
    new_key = pki.generate_private_key("ec-p256").decode()
    second = load_or_generate(path, internal_key=new_key)
    assert second.token_signing_key == new_key
    assert second.token_signing_certificate != first.token_signing_certificate
    assert pki.public_key_matches(second.token_signing_certificate.encode(), new_key.encode())
    assert (second.registry_http_secret, second.auth_secret, second.letsencrypt_account_key) == (
        first.registry_http_secret,
        first.auth_secret,
        first.letsencrypt_account_key,
    )


def test_an_unreadable_stored_certificate_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "appliance-secrets.json"
    first = load_or_generate(path)
    stored = json.loads(first.to_json())
    stored["token_signing_certificate"] = "-----BEGIN CERTIFICATE-----\ntruncated"
    path.write_text(json.dumps(stored))
    again = load_or_generate(path)
    assert again.token_signing_key == first.token_signing_key
    assert pki.public_key_matches(
        again.token_signing_certificate.encode(), again.token_signing_key.encode()
    )


BACKUP = "restore the secrets file from a backup"
CORRUPT = {
    "not JSON": (
        '{"token_signing_key": "abc"',
        "{path}: cannot read the secrets file (Expecting ',' delimiter: line 1 column "
        "28 (char 27)); restore it from a backup - deleting it would invalidate every "
        "issued token.",
    ),
    "empty file": (
        "",
        "{path}: cannot read the secrets file (Expecting value: line 1 column 1 "
        "(char 0)); restore it from a backup - deleting it would invalidate every "
        "issued token.",
    ),
    "a list": ("[]", "{path}: the secrets file is not a JSON object; restore it from a backup."),
    "a number for a secret": (
        '{"auth_secret": 5, "registry_http_secret": null}',
        f"{{path}}: auth_secret, registry_http_secret should be a string; {BACKUP}.",
    ),
    "a key that is not a key": (
        '{"token_signing_key": "-----BEGIN PRIVATE KEY-----\\nxx"}',
        f"{{path}}: token_signing_key is not a readable PEM private key; "
        f"{BACKUP} - a new key would invalidate every issued token.",
    ),
}


@pytest.mark.parametrize(("text", "message"), list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_damaged_file_is_a_clear_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "appliance-secrets.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_or_generate(path)
    assert str(caught.value) == message.format(path=path)
    assert caught.value.exit_code == 2
    assert path.read_text() == text  # never "repaired" by overwriting


def test_an_unreadable_internal_key_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^registry.internal_key: not a readable unencrypted "
        r"PEM private key \(RSA or EC\)\.$",
    ):
        load_or_generate(
            tmp_path / "s.json",
            internal_key="-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----",
        )


def test_a_certificate_swapped_for_another_keys_is_made_again(tmp_path: Path) -> None:
    # The stored digest says the pair agreed; an edit of either side must not be trusted.
    path = tmp_path / "appliance-secrets.json"
    first = load_or_generate(path)
    stored = json.loads(first.to_json())
    other = pki.generate_private_key("ec-p256")
    stored["token_signing_certificate"] = pki.signing_certificate(other, "x").decode()
    path.write_text(json.dumps(stored))
    again = load_or_generate(path)
    assert again.token_signing_key == first.token_signing_key
    assert pki.public_key_matches(
        again.token_signing_certificate.encode(), first.token_signing_key.encode()
    )


def test_a_no_op_load_does_not_need_cryptography(tmp_path: Path) -> None:
    path = tmp_path / "appliance-secrets.json"
    save(path, load_or_generate(path))
    code = (
        "import sys; from pathlib import Path; from appliance.secrets import load_or_generate; "
        f"s = load_or_generate(Path({str(path)!r})); "
        f"assert s.to_json() == Path({str(path)!r}).read_text(); "
        "print(sorted(m for m in sys.modules if m.startswith('cryptography'))[:3])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
