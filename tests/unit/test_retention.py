"""The retention decision (appliance/retention.py) as tables: which tags a policy deletes
and the reason printed for each, the facts read from the history, the policy's checks
and the janitor's schedule."""

from __future__ import annotations

import pytest

from appliance.errors import UsageError
from appliance.retention import (
    Event,
    Policy,
    ProjectPlan,
    TagFacts,
    format_age,
    next_run,
    parse_age,
    policy_from_options,
    select,
    tag_facts,
)

NOW = 1_800_000_000.0
DAY = 86400


def tag(name: str, days_ago: float | None, pulled_days_ago: float | None = None, **extra):
    return TagFacts(
        "team/app",
        name,
        f"sha256:{name}",
        pushed_at=None if days_ago is None else NOW - days_ago * DAY,
        pushed_by="ci",
        last_pulled=None if pulled_days_ago is None else NOW - pulled_days_ago * DAY,
        **extra,
    )


def deleted(policy: Policy, tags: list[TagFacts]) -> list[str]:
    return [v.facts.tag for v in select(policy, tags, NOW) if v.delete]


TAGS = [tag(f"ci-{n}", days_ago=n * 10) for n in range(1, 7)]  # 10, 20, ... 60 days old


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (Policy(keep_last=2), ["ci-3", "ci-4", "ci-5", "ci-6"]),
        (Policy(older_than=35 * DAY), ["ci-4", "ci-5", "ci-6"]),
        (Policy(keep_last=5, older_than=35 * DAY), ["ci-6"]),  # either rule keeps
        (Policy(keep_last=0, older_than=35 * DAY, keep=("-[45]$",)), ["ci-6"]),
        (Policy(keep_last=10), []),
        (Policy(keep_last=0), [f"ci-{n}" for n in range(1, 7)]),
    ],
)
def test_a_tag_goes_only_when_no_keep_rule_holds(policy, expected):
    assert deleted(policy, TAGS) == expected


def test_a_pull_within_the_window_keeps_an_old_tag():
    tags = [tag("old-pulled", 90, pulled_days_ago=3), tag("old", 90, pulled_days_ago=40)]
    assert deleted(Policy(older_than=30 * DAY, pulled_within=14 * DAY), tags) == ["old"]


def test_guarded_and_unknown_tags_are_always_kept_and_say_why():
    tags = [
        tag("v1.0.0", 400, guarded_by="immutable '^v'"),
        tag("latest", 400, guarded_by="protected 'latest=maintainer'"),
        tag("before-history", None),
        tag("ci-old", 400),
    ]
    verdicts = {v.facts.tag: v for v in select(Policy(keep_last=0), tags, NOW)}
    assert [t for t, v in verdicts.items() if v.delete] == ["ci-old"]
    assert verdicts["v1.0.0"].reason == "kept: guarded by the tag rule immutable '^v'"
    assert verdicts["before-history"].reason == "kept: no push in the history (age unknown)"


def test_guarded_tags_count_among_the_newest():
    """keep-last counts every dated tag: 'the newest N', whatever else keeps them."""
    tags = [tag("v2", 1, guarded_by="immutable '^v'"), tag("ci-a", 2), tag("ci-b", 3)]
    assert deleted(Policy(keep_last=2), tags) == ["ci-b"]


def test_the_printed_line_says_when_who_and_why():
    [verdict] = [
        v
        for v in select(Policy(keep_last=1, older_than=30 * DAY), [tag("a", 1), tag("b", 45)], NOW)
        if v.delete
    ]
    assert verdict.line(NOW) == (
        "team/app:b  pushed 45d ago by ci, never pulled: not among the newest 1, older than 30d"
    )


def test_facts_from_the_history():
    """The push of the tag's current digest counts (an older push of another digest under
    the same tag does not); a pull of the tag, its digest or its index's platform does."""
    events = [
        Event("push", "app", "sha256:old", "alice", 100.0),
        Event("push", "app", "sha256:index", "ci", 200.0),
        Event("push", "app", "sha256:index", "bob", 300.0),  # the same digest again
        Event("pull", None, "sha256:amd64", "k8s", 400.0),  # a platform, by digest
        Event("push", "other", "sha256:x", "ci", 50.0),
        Event("pull", "other", "sha256:x", None, 60.0),
    ]
    facts = tag_facts(
        "team/app",
        {"app": "sha256:index", "other": "sha256:x", "orphan": "sha256:y"},
        events,
        children={"sha256:index": ["sha256:amd64", "sha256:arm64"]},
    )
    got = {f.tag: (f.pushed_at, f.pushed_by, f.last_pulled) for f in facts}
    assert got == {
        "app": (300.0, "bob", 400.0),
        "orphan": (None, None, None),
        "other": (50.0, "ci", 60.0),
    }


def test_max_delete_stops_the_whole_project():
    plan = ProjectPlan("team", Policy(keep_last=0, max_delete=3))
    plan.verdicts = select(plan.policy, TAGS, NOW)
    assert plan.over_limit
    assert "would delete 6 tags, more than --max-delete 3; nothing was deleted in team" in (
        plan.refusal()
    )
    plan = ProjectPlan("team", Policy(keep_last=0, max_delete=6))
    plan.verdicts = select(plan.policy, TAGS, NOW)
    assert not plan.over_limit


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * DAY), ("12h", 43200), ("2w", 14 * DAY), (" 90s ", 90)]
)
def test_ages(text, seconds):
    assert parse_age("--older-than", text) == seconds


@pytest.mark.parametrize("text", ["30", "0d", "1y", "-3d", "d", "3 days"])
def test_a_bad_age_is_one_sentence(text):
    with pytest.raises(UsageError, match=r"--older-than .* is not an age; give a number and a"):
        parse_age("--older-than", text)


def test_format_age_round_trips():
    assert [format_age(s) for s in (30 * DAY, 14 * DAY, 5400, 90, 3600)] == [
        "30d",
        "2w",
        "90m",
        "90s",
        "1h",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((None, None, None, "14d", None), "needs --keep-last N or --older-than AGE"),
        ((-1, None, None, None, None), "--keep-last -1 is not a whole number"),
        ((3, ["("], None, None, None), "--keep '\\(' is not a valid regular expression"),
        ((3, None, "soon", None, None), "--older-than 'soon' is not an age"),
        ((3, None, None, None, -2), "--max-delete -2 is not a whole number"),
    ],
)
def test_a_bad_policy_is_one_sentence(options, message):
    with pytest.raises(UsageError, match=message):
        policy_from_options(*options)


def test_describe():
    policy = policy_from_options(10, ["^v[0-9]", "^v[0-9]"], "30d", "14d", 50)
    assert policy.keep == ("^v[0-9]",)
    assert policy.describe() == (
        "keeps the newest 10 per repository, tags matching '^v[0-9]', tags pushed within "
        "30d, tags pulled within 2w; deletes the other tags; a run that would delete more "
        "than 50 deletes nothing"
    )


def test_the_janitor_runs_once_a_period_at_a_stable_offset_per_host():
    runs = [next_run(NOW + k, "registry.example.com", 3600) for k in range(0, 7200, 600)]
    assert all(run > NOW + k for run, k in zip(runs, range(0, 7200, 600), strict=True))
    assert len({run % 3600 for run in runs}) == 1  # the same offset every period
    assert all(run - (NOW + k) <= 3600 for run, k in zip(runs, range(0, 7200, 600), strict=True))
    other = next_run(NOW, "other.example.com", 3600)
    assert other % 3600 != runs[0] % 3600  # another host, another offset


def test_a_bounded_pull_history_keeps_what_it_can_no_longer_see():
    """The history keeps the last 1,000 pulls of a repository: when the oldest of them is
    younger than --pulled-within, a tag not seen pulled may have been pulled before it."""
    policy = Policy(older_than=30 * DAY, pulled_within=14 * DAY)
    tags = [tag("old", 90)]
    assert deleted(policy, tags) == ["old"]  # the whole history is known
    [verdict] = select(policy, tags, NOW, pulls_known_since=NOW - 2 * DAY)
    assert not verdict.delete
    assert verdict.reason.startswith("kept: the pull history reaches back only 2d")
    short = Policy(older_than=30 * DAY, pulled_within=DAY)  # the history covers that day
    [verdict] = select(short, tags, NOW, pulls_known_since=NOW - 2 * DAY)
    assert verdict.delete
    [verdict] = select(Policy(keep_last=0), tags, NOW, pulls_known_since=NOW - 2 * DAY)
    assert verdict.delete  # no --pulled-within: pulls do not matter
