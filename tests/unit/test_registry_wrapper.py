"""The registry wrapper's log filter (appliance/programs/registry.py), as a table: what
a line the registry prints becomes before it reaches supervisord's log."""

from __future__ import annotations

import pytest

from appliance.programs.registry import SecretFilter

SECRETS = ["Bearer hook-token-0123", "http-secret-0123456789", "abc", "1"]


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        (
            'msg="configuring endpoint hook (http://h/e), headers=map[Authorization:'
            '[Bearer hook-token-0123]]"',
            'msg="configuring endpoint hook (http://h/e), headers=map[Authorization:[********]]"',
        ),
        ("secret=http-secret-0123456789 inside", "secret=******** inside"),
        ("a short secret alone: abc", "a short secret alone: ********"),
        ('in brackets [abc] or quotes "1"', 'in brackets [********] or quotes "********"'),
        (
            "a short secret inside a word: abcdef 10.0.0.1",
            "a short secret inside a word: abcdef 10.0.0.1",
        ),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_every_configured_secret_is_masked_short_ones_as_whole_words(line, logged):
    assert SecretFilter(SECRETS)(line) == logged


def test_a_secret_containing_another_is_masked_whole():
    mask = SecretFilter(["token-0123456789", "token-0123456789-longer"])
    assert mask("x token-0123456789-longer y") == "x ******** y"
