"""The converge loop: what it prints, what it writes, and what it asks services to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.engine import Engine, Redactor, Report, queue, raise_if_failed
from appliance.errors import ResourceError
from appliance.resources import Directory, File, Link, Notify, reload, restart


def converge(resources: list, dry_run: bool = False) -> tuple[Report, list[str]]:
    lines: list[str] = []
    report = Engine(lines.append, dry_run=dry_run).converge(resources)
    return report, lines


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every path under root with its mode and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            body = (
                os.readlink(path)
                if path.is_symlink()
                else path.read_bytes()
                if path.is_file()
                else None
            )
            out[str(path.relative_to(root))] = (st.st_mode, body)
    return out


# ---------------------------------------------------------------- the notification queue

QUEUES = {
    "one": ([reload("nginx")], [Notify("reload", "nginx")]),
    "duplicates collapse": ([reload("nginx"), reload("nginx"), reload("nginx")], [reload("nginx")]),
    "restart after reload wins": ([reload("nginx"), restart("nginx")], [restart("nginx")]),
    "reload after restart does not downgrade": (
        [restart("nginx"), reload("nginx")],
        [restart("nginx")],
    ),
    "services kept apart, first-queued order": (
        [
            restart("registry"),
            reload("nginx"),
            reload("auth"),
            restart("nginx"),
            restart("registry"),
        ],
        [restart("registry"), restart("nginx"), reload("auth")],
    ),
    "nothing": ([], []),
}


@pytest.mark.parametrize(("asked", "expected"), list(QUEUES.values()), ids=list(QUEUES))
def test_queue(asked: list[Notify], expected: list[Notify]) -> None:
    result: list[Notify] = []
    for notify in asked:
        result = queue(result, [notify])
    assert result == expected
    assert queue([], asked) == expected


def test_notifications_are_delayed_until_every_resource_is_in_place(tmp_path: Path) -> None:
    resources = [
        File(tmp_path / "nginx.conf", "a\n", notifies=(reload("nginx"),)),
        File(tmp_path / "site.conf", "b\n", notifies=(reload("nginx"),)),
        File(tmp_path / "cert.pem", "c\n", notifies=(restart("nginx"), restart("registry"))),
        File(tmp_path / "registry.yml", "d\n", notifies=(restart("registry"),)),
    ]
    report, lines = converge(resources)
    # Handed back, not run: the caller runs them once, after the last file.
    assert report.notifications == [restart("nginx"), restart("registry")]
    assert all("restart" not in line and "reload" not in line for line in lines)
    assert report.updated == 4


def test_nothing_changed_notifies_nothing(tmp_path: Path) -> None:
    resources = [
        Directory(tmp_path / "conf", 0o755, notifies=(restart("nginx"),)),
        File(tmp_path / "conf/nginx.conf", "a\n", notifies=(reload("nginx"),)),
        Link(tmp_path / "current", "conf", notifies=(restart("registry"),)),
    ]
    first, _ = converge(resources)
    assert first.notifications == [restart("nginx"), restart("registry")]
    second, lines = converge(resources)
    assert second.notifications == []
    assert second.updated == 0 and len(second.outcomes) == 3
    assert lines == [
        f"  directory {tmp_path}/conf (up to date)",
        f"  file {tmp_path}/conf/nginx.conf (up to date)",
        f"  link {tmp_path}/current (up to date)",
    ]


def test_only_the_changed_resource_notifies(tmp_path: Path) -> None:
    (tmp_path / "nginx.conf").write_text("same\n")
    os.chmod(tmp_path / "nginx.conf", 0o644)
    report, _ = converge(
        [
            File(tmp_path / "nginx.conf", "same\n", notifies=(reload("nginx"),)),
            File(tmp_path / "registry.yml", "new\n", notifies=(restart("registry"),)),
        ]
    )
    assert report.notifications == [restart("registry")]


# ---------------------------------------------------------------- output


def test_output_lines(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("level: info\nport: 1\n")
    os.chmod(tmp_path / "config.yml", 0o600)
    (tmp_path / "same.yml").write_text("x\n")
    os.chmod(tmp_path / "same.yml", 0o644)
    _, lines = converge(
        [
            Directory(tmp_path / "logs", 0o750),
            File(tmp_path / "config.yml", "level: debug\nport: 1\n", 0o640),
            File(tmp_path / "same.yml", "x\n"),
            File(tmp_path / "secret.json", '{"key": "hunter2"}\n', 0o600, sensitive=True),
        ]
    )
    assert lines == [
        f"+ directory {tmp_path}/logs (created)",
        f"+ file {tmp_path}/config.yml (updated: update content, mode 0600 -> 0640)",
        f"    --- {tmp_path}/config.yml (current)\n"
        f"    +++ {tmp_path}/config.yml (new)\n"
        f"    @@ -1,2 +1,2 @@\n"
        f"    -level: info\n"
        f"    +level: debug\n"
        f"     port: 1",
        f"  file {tmp_path}/same.yml (up to date)",
        f"+ file {tmp_path}/secret.json (created)",
    ]
    assert "hunter2" not in "\n".join(lines)


def test_output_names_templates_as_templates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance import resources

    (tmp_path / "files").mkdir()
    (tmp_path / "files/t.j2").write_text("port: {{ port }}\n")
    monkeypatch.setattr(resources, "files_dir", lambda: tmp_path / "files")
    monkeypatch.setattr(resources, "_environment", None)
    target = tmp_path / "x.yml"
    target.write_text("port: 1\n")
    os.chmod(target, 0o644)
    _, lines = converge([resources.Template(target, "t.j2", {"port": 2})])
    assert lines[0] == f"+ template {target} (updated: update content)"
    _, lines = converge([resources.Template(target, "t.j2", {"port": 2})])
    assert lines == [f"  template {target} (up to date)"]


# ---------------------------------------------------------------- dry run


def test_dry_run_prints_plan_and_diffs_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir(mode=0o700)
    (tmp_path / "conf/nginx.conf").write_text("worker_processes 1;\n")
    os.chmod(tmp_path / "conf/nginx.conf", 0o644)
    (tmp_path / "old.conf").write_text("x\n")
    before = snapshot(tmp_path)
    resources = [
        Directory(tmp_path / "conf", 0o755, notifies=(restart("nginx"),)),
        File(tmp_path / "conf/nginx.conf", "worker_processes 2;\n", notifies=(reload("nginx"),)),
        File(tmp_path / "conf/new.conf", "listen 443;\n"),
        Link(tmp_path / "current", "conf"),
        Directory(tmp_path / "logs"),
        File(tmp_path / "logs/inside-a-missing-dir.log", "x\n"),
    ]
    report, lines = converge(resources, dry_run=True)
    assert snapshot(tmp_path) == before
    assert lines == [
        f"+ directory {tmp_path}/conf (would update: mode 0700 -> 0755)",
        f"+ file {tmp_path}/conf/nginx.conf (would update: update content)",
        f"    --- {tmp_path}/conf/nginx.conf (current)\n"
        f"    +++ {tmp_path}/conf/nginx.conf (new)\n"
        f"    @@ -1 +1 @@\n"
        f"    -worker_processes 1;\n"
        f"    +worker_processes 2;",
        f"+ file {tmp_path}/conf/new.conf (would create)",
        f"    --- {tmp_path}/conf/new.conf (current)\n"
        f"    +++ {tmp_path}/conf/new.conf (new)\n"
        f"    @@ -0,0 +1 @@\n"
        f"    +listen 443;",
        f"+ link {tmp_path}/current (would update: create -> conf)",
        f"+ directory {tmp_path}/logs (would create)",
        f"+ file {tmp_path}/logs/inside-a-missing-dir.log (would create)",
        f"    --- {tmp_path}/logs/inside-a-missing-dir.log (current)\n"
        f"    +++ {tmp_path}/logs/inside-a-missing-dir.log (new)\n"
        f"    @@ -0,0 +1 @@\n"
        f"    +x",
    ]
    # The same plan a real run would act on, notifications included.
    assert report.updated == 6
    assert report.notifications == [restart("nginx")]
    real, real_lines = converge(resources)
    assert [
        line.replace("would update", "updated").replace("would create", "created") for line in lines
    ] == real_lines
    assert real.notifications == report.notifications


# ---------------------------------------------------------------- failure


def test_a_failing_resource_stops_the_run_and_keeps_earlier_notifications(tmp_path: Path) -> None:
    def nginx_t(candidate: Path) -> None:
        raise ResourceError('nginx -t: unknown directive "lisen"')

    (tmp_path / "nginx.conf").write_text("listen 443;\n")
    resources = [
        File(tmp_path / "cert.pem", "cert\n", notifies=(reload("nginx"),)),
        File(tmp_path / "registry.yml", "v2\n", notifies=(restart("registry"),)),
        File(tmp_path / "nginx.conf", "lisen 443;\n", notifies=(restart("nginx"),), verify=nginx_t),
        File(tmp_path / "later.conf", "never\n", notifies=(restart("auth"),)),
    ]
    report, lines = converge(resources)
    # Decision (engine docstring): files already on disk keep their notifications, so
    # the services that read them are not left running on the old version.
    assert report.notifications == [reload("nginx"), restart("registry")]
    assert (tmp_path / "nginx.conf").read_text() == "listen 443;\n"
    assert not (tmp_path / "later.conf").exists()
    assert lines[-1] == (
        f'! file {tmp_path}/nginx.conf (failed: nginx -t: unknown directive "lisen")'
    )
    assert [str(o.resource) for o in report.outcomes] == [
        f"file {tmp_path}/cert.pem",
        f"file {tmp_path}/registry.yml",
        f"file {tmp_path}/nginx.conf",
    ]
    assert report.failed is report.outcomes[-1]
    assert report.updated == 2
    with pytest.raises(ResourceError, match=rf"^file {tmp_path}/nginx.conf failed: nginx -t"):
        raise_if_failed(report)


def test_an_os_error_is_a_failure_with_the_path(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    blocker = tmp_path / "ro/file"
    blocker.write_text("x")
    report, lines = converge(
        [
            File(tmp_path / "a.conf", "a\n", notifies=(reload("nginx"),)),
            File(blocker / "below-a-file.conf", "b\n"),
        ]
    )
    assert report.notifications == [reload("nginx")]
    assert report.failed is not None
    assert lines[-1].startswith(f"! file {blocker}/below-a-file.conf (failed: Not a directory")


def test_a_plan_that_refuses_stops_a_dry_run_too(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    report, lines = converge(
        [Directory(tmp_path / "data"), Directory(tmp_path / "after")], dry_run=True
    )
    assert lines == [
        f"! directory {tmp_path}/data (failed: {tmp_path}/data exists and is not "
        f"a directory; move it away.)"
    ]
    assert report.failed is not None and len(report.outcomes) == 1


def test_a_successful_report_raises_nothing(tmp_path: Path) -> None:
    report, _ = converge([File(tmp_path / "a", "a\n")])
    assert report.failed is None
    raise_if_failed(report)
    assert report.elapsed > 0


def test_a_recipe_that_cannot_build_its_next_resource_is_a_failure_too(tmp_path: Path) -> None:
    def recipe():  # noqa: ANN202 - a generator like recipes.resources()
        yield File(tmp_path / "cert.pem", "cert\n", notifies=(reload("nginx"),))
        raise ResourceError(
            "template nginx/nginx.conf.j2: 'port' is undefined; this is a bug "
            "in the recipe that renders it."
        )

    report, lines = converge(recipe())
    assert report.notifications == [reload("nginx")]
    assert lines[-1] == (
        "! next resource (failed: template nginx/nginx.conf.j2: 'port' is "
        "undefined; this is a bug in the recipe that renders it.)"
    )
    with pytest.raises(ResourceError, match="^next resource failed: template nginx"):
        raise_if_failed(report)


# ---------------------------------------------------------------- masking

PEM = (
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBbW0xq3Ow8d2L1c+Yp3oXoQp7cQ\n"
    "AoGCCqGSM49AwEHoUQDQgAE9nVjJfTqS0r3\n-----END EC PRIVATE KEY-----\n"
)

# (secret values, a line printed, the line as it must appear)
MASKING = {
    "long value anywhere": (
        ["topsecretvalue123"],
        'environment = REGISTRY_STORAGE_S3_SECRETKEY="topsecretvalue123"',
        'environment = REGISTRY_STORAGE_S3_SECRETKEY="********"',
    ),
    "YAML value": (
        ["very-secret-key"],
        "+      secretkey: very-secret-key\n",
        "+      secretkey: ********\n",
    ),
    "short value as a YAML list item": (["1"], "+        - '1'\n", "+        - ********\n"),
    "short value elsewhere is ordinary text": (
        ["1"],
        "+  addr: 127.0.0.1:5111\n",
        "+  addr: 127.0.0.1:5111\n",
    ),
    "short value quoted in environment=": (
        ["abc"],
        'environment = A="abc",B="abcd"',
        'environment = A="********",B="abcd"',
    ),
    "JSON-escaped": (
        ['pa"ss\\word-long'],
        '  "password": "pa\\"ss\\\\word-long"',
        '  "password": "********"',
    ),
    "supervisord's doubled %": (["100%-secret-value"], 'X="100%%-secret-value"', 'X="********"'),
    "longest first": (["secret-value", "secret-value-plus"], "a: secret-value-plus", "a: ********"),
    "a PEM key a line at a time": ([PEM], "-AoGCCqGSM49AwEHoUQDQgAE9nVjJfTqS0r3", "-********"),
    "nothing to mask": ([], "level: info", "level: info"),
}


@pytest.mark.parametrize(("values", "line", "expected"), list(MASKING.values()), ids=list(MASKING))
def test_redactor_masks_secret_values(values: list[str], line: str, expected: str) -> None:
    assert Redactor(values)(line) == expected


def test_engine_masks_every_diff_and_failure_whatever_the_resource(tmp_path: Path) -> None:
    """No resource is marked sensitive here: the engine masks by value."""
    (tmp_path / "registry.conf").write_text('environment = KEY="old-secret-value"\n')
    lines: list[str] = []
    engine = Engine(
        lines.append, redact=Redactor(["old-secret-value", "new-secret-value", "dir-secret-value"])
    )
    engine.converge(
        [
            File(tmp_path / "registry.conf", 'environment = KEY="new-secret-value"\n'),
            File(tmp_path / "dir-secret-value" / "x", "y"),  # its directory is missing: fails
        ]
    )
    printed = "\n".join(lines)
    assert 'environment = KEY="********"' in printed
    assert "! file " in printed and "dir-secret-value" not in printed
    assert "old-secret-value" not in printed and "new-secret-value" not in printed
    assert "new-secret-value" in (tmp_path / "registry.conf").read_text()


def test_engine_masks_secrets_the_run_no_longer_knows_by_the_same_rule(tmp_path: Path) -> None:
    """The file on disk holds last run's secrets: found under sensitive keys (YAML, JSON,
    supervisord's environment=) and masked on both sides of the diff."""
    from appliance.settings import is_sensitive

    (tmp_path / "config.yml").write_text(
        "storage:\n  s3:\n    secretkey: old-key-value\n    bucket: b\n"
    )
    (tmp_path / "program.conf").write_text(
        'environment = GOGC="400",REGISTRY_X_SECRET="old-env-value"\n'
    )
    lines: list[str] = []
    Engine(lines.append, dry_run=True, redact=Redactor([], is_sensitive)).converge(
        [
            File(
                tmp_path / "config.yml",
                "storage:\n  s3:\n    secretkey: new-key-value\n    bucket: c\n",
            ),
            File(tmp_path / "program.conf", 'environment = GOGC="400",REGISTRY_X_SECRET="1"\n'),
        ]
    )
    printed = "\n".join(lines)
    for secret in ("old-key-value", "new-key-value", "old-env-value"):
        assert secret not in printed
    assert "    -    secretkey: ********\n" in printed
    assert "    +    secretkey: ********\n" in printed
    assert '+environment = GOGC="400",REGISTRY_X_SECRET="********"' in printed
    assert "+    bucket: c" in printed
