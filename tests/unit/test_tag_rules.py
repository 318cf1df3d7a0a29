"""The tag rules as tables: parsing what the admin types, and the decision on one
manifest write from its facts (no database, registry or clock); then the reservation in
the store, whose unique key is what lets exactly one of two first pushes through, and
the token verification that tells the gate who pushes."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.auth.store import Store, ensure_schema
from appliance.auth.tag_rules import (
    DEPLOY_TOKEN_RANK,
    IMMUTABLE,
    PROTECTED,
    RANKS,
    RESERVATION_SECONDS,
    InvalidTagRuleError,
    Reservation,
    TagRule,
    decide_delete,
    decide_push,
    guarded,
    parse_immutable,
    parse_protected,
)
from appliance.auth.tokens import TokenSigner, TokenVerifier
from tests.support.auth_server import write_signing_material

RULES = [
    TagRule(IMMUTABLE, r"^v[0-9]+\."),
    TagRule(PROTECTED, "latest", "maintainer"),
    TagRule(PROTECTED, "^release$", "admin"),
]
A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64
DEV, MAINT, OWNER, ADMIN = RANKS["developer"], RANKS["maintainer"], RANKS["owner"], RANKS["admin"]
NOW = 1_000_000.0


# -- what the admin types -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "rules"),
    [
        ([r"^v[0-9]+\."], [TagRule(IMMUTABLE, r"^v[0-9]+\.")]),
        (["^v", "-rc$", "^v"], [TagRule(IMMUTABLE, "^v"), TagRule(IMMUTABLE, "-rc$")]),
        ([""], []),
        (["none"], []),
        (["NONE"], []),
    ],
)
def test_immutable_patterns(values, rules):
    assert parse_immutable(values) == rules


@pytest.mark.parametrize(
    ("values", "rules"),
    [
        (["latest=maintainer"], [TagRule(PROTECTED, "latest", "maintainer")]),
        (["^a=b$=owner"], [TagRule(PROTECTED, "^a=b$", "owner")]),  # the role after the last =
        (
            ["^prod-=admin", "x=developer"],
            [TagRule(PROTECTED, "^prod-", "admin"), TagRule(PROTECTED, "x", "developer")],
        ),
        (["none"], []),
    ],
)
def test_protected_patterns(values, rules):
    assert parse_protected(values) == rules


@pytest.mark.parametrize(
    ("parse", "values", "message"),
    [
        (
            parse_immutable,
            ["^v[0-9"],
            "--immutable-tags '^v[0-9' is not a valid regular expression",
        ),
        (parse_immutable, ["(?P<x"], "is not a valid regular expression"),
        (parse_immutable, ["a" * 201], "is 201 characters long; use at most 200"),
        (parse_immutable, ["a\nb"], "contains control characters"),
        (parse_immutable, [f"t{n}" for n in range(21)], "given 21 times; use at most 20"),
        (parse_immutable, ["none", "^v"], "give it alone"),
        (parse_protected, ["latest"], "'latest' is not PATTERN=ROLE"),
        (parse_protected, ["=maintainer"], "is not PATTERN=ROLE"),
        (parse_protected, ["latest=reporter"], "'reporter' is not a role that may push"),
        (parse_protected, ["latest=Maintainer"], "'Maintainer' is not a role that may push"),
        (parse_protected, ["[=owner"], "'[' is not a valid regular expression"),
    ],
)
def test_bad_patterns_are_one_sentence_and_exit_2(parse, values, message):
    with pytest.raises(InvalidTagRuleError) as refused:
        parse(values)
    assert message in str(refused.value)
    assert refused.value.exit_code == 2
    assert "\n" not in str(refused.value)


# -- pushing a tag ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "digest", "rank", "current", "reservation", "allowed", "reserve", "says"),
    [
        # no rule on the tag: nothing to know
        ("main", A, DEV, None, None, True, False, ""),
        ("v1", B, DEV, A, None, True, False, ""),  # no dot: not '^v[0-9]+\.'
        # immutable: the first push reserves, the same digest passes, another is refused
        ("v1.0.0", A, DEV, None, None, True, True, ""),
        ("v1.0.0", A, DEV, A, None, True, False, ""),
        ("v1.0.0", B, DEV, A, None, False, False, "tag v1.0.0 is immutable in team/app"),
        ("v1.0.0", B, ADMIN, A, None, False, False, "points at " + A),  # nobody moves it
        # a push in flight holds the tag against other digests, not against its own
        ("v1.0.0", B, DEV, None, Reservation(A, NOW - 1), False, False, "another push of it"),
        ("v1.0.0", A, DEV, None, Reservation(A, NOW - 1), True, True, ""),
        # ...for RESERVATION_SECONDS: then it never stored its manifest, and is taken over
        ("v1.0.0", B, DEV, None, Reservation(A, NOW - RESERVATION_SECONDS), True, True, ""),
        # protected: the role, then the content
        ("latest", A, DEV, None, None, False, False, "only the maintainer role or above may push"),
        ("latest", A, DEPLOY_TOKEN_RANK, None, None, False, False, "tag latest is protected"),
        ("latest", A, MAINT, B, None, True, False, ""),
        ("latest-rc", A, DEV, None, None, False, False, "tag latest-rc is protected"),  # search
        ("release", A, OWNER, None, None, False, False, "only administrators may push"),
        ("release", A, ADMIN, None, None, True, False, ""),
        ("release-1", A, DEV, None, None, True, False, ""),  # anchored
    ],
)
def test_push_decision(tag, digest, rank, current, reservation, allowed, reserve, says):
    verdict = decide_push(RULES, "team/app", tag, digest, rank, current, reservation, NOW)
    assert (verdict.allowed, verdict.reserve) == (allowed, reserve)
    assert says in verdict.message
    assert bool(verdict.message) != allowed


# -- deleting a manifest ------------------------------------------------------------------
C = "sha256:" + "c" * 64


@pytest.mark.parametrize(
    ("reference", "rank", "tags", "allowed", "says"),
    [
        (A, MAINT, {}, True, ""),
        (A, MAINT, {"v1.0.0": (B,)}, True, ""),  # the immutable tag is on another manifest
        (
            A,
            MAINT,
            {"v1.0.0": (A,)},
            False,
            f"tag v1.0.0 is immutable in team/app (rule '^v[0-9]+\\.'): its manifest {A}"
            " cannot be deleted",
        ),
        (A, ADMIN, {"v1.0.0": (A,)}, False, "is immutable"),
        # a platform manifest of an immutable index: deleting it would break the index
        (B, MAINT, {"v1.0.0": (C, A, B)}, False, f"its image index {C} lists {B}"),
        (A, MAINT, {"latest": (A,)}, True, ""),
        (A, DEV, {"latest": (A,)}, False, "only the maintainer role or above may delete it"),
        (A, DEV, {"latest": (C, A)}, False, "tag latest is protected"),
        (A, OWNER, {"release": (A,)}, False, "tag release is protected"),
        ("v1.0.0", MAINT, {"v1.0.0": (A,)}, False, "its manifest"),  # by tag
        ("v1.0.0", MAINT, {}, True, ""),  # no such tag
    ],
)
def test_delete_decision(reference, rank, tags, allowed, says):
    verdict = decide_delete(RULES, "team/app", reference, rank, tags)
    assert verdict.allowed == allowed
    assert says in verdict.message


def test_what_retention_must_keep():
    assert guarded(RULES, "v1.2.3").kind == IMMUTABLE
    assert guarded(RULES, "latest").kind == PROTECTED
    assert guarded(RULES, "main") is None


# -- the reservation in the database -------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    ensure_schema(tmp_path / "auth.db")
    store = Store(tmp_path / "auth.db")
    yield store
    store.close()


def test_two_first_pushes_with_different_digests_exactly_one_reserves(tmp_path, store):
    for round_ in range(20):
        tag, start, won = f"v1.0.{round_}", threading.Barrier(8), []

        def reserve(digest: str, tag: str = tag, start=start, won=won) -> None:
            own = Store(tmp_path / "auth.db")  # each worker has its own connection
            start.wait()
            if own.reserve_tag("team/app", tag, digest, time.time(), None):
                won.append(digest)
            own.close()

        threads = [threading.Thread(target=reserve, args=(f"sha256:{n}",)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1, won
        assert store.reservation("team/app", tag).digest == won[0]


def test_the_same_digest_may_reserve_again_and_a_stale_one_is_taken_over_once(store):
    assert store.reserve_tag("team/app", "v1.0.0", A, NOW, None)
    assert store.reserve_tag("team/app", "v1.0.0", A, NOW + 1, None)  # the same push again
    assert not store.reserve_tag("team/app", "v1.0.0", B, NOW + 1, None)
    stale = store.reservation("team/app", "v1.0.0")
    assert stale == Reservation(A, NOW)
    assert store.reserve_tag("team/app", "v1.0.0", B, NOW + 100, stale)
    # A second taker that read the same stale row loses: the row changed under it.
    assert not store.reserve_tag("team/app", "v1.0.0", "sha256:c", NOW + 100, stale)
    store.record_tag("team/app", "v1.0.0", A, NOW + 200)  # what the registry holds wins
    assert store.reservation("team/app", "v1.0.0").digest == A


def test_rules_replace_each_kind_and_go_with_their_project(store):
    store.create_project("team/app", "private", True)
    project = store.project("team/app")
    store.set_tag_rules("team/app", IMMUTABLE, parse_immutable(["^v", "-rc$"]))
    store.set_tag_rules("team/app", PROTECTED, parse_protected(["latest=maintainer"]))
    store.set_tag_rules("team/app", IMMUTABLE, parse_immutable(["^v[0-9]+\\."]))
    assert store.tag_rules(project.id) == [
        TagRule(IMMUTABLE, "^v[0-9]+\\."),
        TagRule(PROTECTED, "latest", "maintainer"),
    ]
    store.delete_project("team/app")
    assert store.tag_rules(project.id) == []


# -- who pushes: the token, verified ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_the_verifier_takes_the_signers_tokens_and_nothing_else(tmp_path, kind):
    key, certificate = write_signing_material(tmp_path, kind)
    signer = TokenSigner(key, certificate, "issuer", "service", 300)
    verifier = TokenVerifier(certificate, "issuer", "service")
    access = [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    token = signer.issue("alice", access, NOW).token
    assert verifier.claims(token, NOW + 10)["sub"] == "alice"
    assert verifier.claims(token, NOW + 300 + 61) is None  # expired, past the leeway
    header, payload, signature = token.split(".")
    forged = signer.issue("root", access, NOW).token.split(".")[1]
    assert verifier.claims(f"{header}.{forged}.{signature}", NOW) is None
    assert verifier.claims("not a token", NOW) is None
    other = TokenVerifier(certificate, "another-issuer", "service")
    assert other.claims(token, NOW) is None
