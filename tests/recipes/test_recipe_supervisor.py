"""The supervisor recipe, judged by supervisord's own config reader.

What reaches supervisord is parsed here with supervisor's ServerOptions, exactly as
supervisord parses it at start and at `update`: a quoting mistake shows up as the wrong
argv or environment, not as a string that merely looks right.
"""

from __future__ import annotations

import shlex
import signal

from supervisor.options import ServerOptions

from appliance.resources import Directory
from recipes import supervisor
from tests.support.recipes import SECRETS, settings_for


def write(resources: list) -> None:
    """The directories and files, as the engine would leave them (owners aside)."""
    for resource in resources:
        if isinstance(resource, Directory):
            resource.path.mkdir(parents=True, exist_ok=True)
        elif hasattr(resource, "content"):
            resource.path.parent.mkdir(parents=True, exist_ok=True)
            resource.path.write_bytes(resource.content)


def supervisord_reads(settings) -> ServerOptions:
    options = ServerOptions()
    options.realize(args=["-c", str(settings.paths.supervisor_config)])
    return options


def test_supervisord_config_as_supervisord_reads_it(tmp_path):
    settings = settings_for(tmp_path, logging={"max_bytes": 1048576, "backups": 3})
    write(supervisor.resources(settings, SECRETS))
    options = supervisord_reads(settings)
    [server] = options.server_configs
    assert server["file"] == str(tmp_path / "var/opt/appliance/supervisor/supervisor.sock")
    assert server["chmod"] == 0o700
    assert options.logfile == str(tmp_path / "var/log/appliance/supervisor/supervisord.log")
    assert (options.logfile_maxbytes, options.logfile_backups) == (1048576, 3)
    assert options.pidfile == str(tmp_path / "var/opt/appliance/supervisor/supervisord.pid")
    assert options.nodaemon is False


def test_a_program_as_supervisord_reads_it(tmp_path):
    settings = settings_for(tmp_path, logging={"max_bytes": 2097152, "backups": 4})
    command = ["/usr/bin/tool", "--name", "two words", "--pattern", "100%", "--q", "it's"]
    environment = {"B_COMMA": "a,b", "A_PERCENT": "50%", "C_FLAG": False, "D_QUOTES": 'x "y" z'}
    write(supervisor.resources(settings, SECRETS))
    write(
        supervisor.program(
            settings, "tool", command, environment=environment, stopsignal="QUIT", stopwaitsecs=7
        )
    )
    [group] = supervisord_reads(settings).process_group_configs
    [program] = group.process_configs
    assert program.name == "tool"
    launcher = supervisor.launched(settings, "tool", [])
    assert shlex.split(program.command) == [*launcher, *command]
    assert launcher[-3:] == [str(settings.paths.supervisor_config), "tool", "--"]
    assert program.environment == {
        "A_PERCENT": "50%",
        "B_COMMA": "a,b",
        "C_FLAG": "false",
        "D_QUOTES": 'x "y" z',
    }
    assert program.uid is None  # an ordinary user's programs run as that user
    assert program.stopsignal == signal.SIGQUIT and program.stopwaitsecs == 7
    assert program.stdout_logfile == str(tmp_path / "var/log/appliance/tool/current")
    assert (program.stdout_logfile_maxbytes, program.stdout_logfile_backups) == (2097152, 4)
    assert program.redirect_stderr and program.stopasgroup and program.killasgroup
    assert program.autostart and program.autorestart


def test_as_root_a_program_runs_as_its_account_and_supervisord_as_root(tmp_path):
    settings = settings_for(tmp_path, run_as_root=True)
    resources = supervisor.resources(settings, SECRETS)
    [conf] = [r for r in resources if getattr(r, "path", None) == settings.paths.supervisor_config]
    assert "\nuser = root\n" in conf.content.decode()
    [log_dir, _, program] = supervisor.program(
        settings, "registry", ["/bin/true"], user="appliance-registry"
    )
    assert "\nuser = appliance-registry\n" in program.content.decode()
    # supervisord (root) writes there: root's, readable by the admin group, never the
    # service's (it could plant a symlink for root to append to).
    assert (log_dir.owner, log_dir.group, log_dir.mode) == ("root", "adm", 0o750)


def test_disabled_program_is_an_absent_file(tmp_path):
    settings = settings_for(tmp_path)
    [absent] = supervisor.disabled(settings, "registry")
    assert absent.path == tmp_path / "var/opt/appliance/supervisor/conf.d/registry.conf"


def test_a_symlink_left_at_a_log_file_is_removed_not_followed(tmp_path):
    """An install upgraded from service-owned log directories: the service may have left
    `current` as a symlink, which supervisord (root) would follow."""
    settings = settings_for(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("root's own line\n")
    current = tmp_path / "var/log/appliance/registry/current"
    current.parent.mkdir(parents=True)
    current.symlink_to(victim)
    [_, guard, _] = supervisor.program(settings, "registry", ["/bin/true"])
    assert [c.summary for c in guard.plan(guard.current())] == [f"remove symlink to {victim}"]
    guard.apply()
    assert not current.exists() and victim.read_text() == "root's own line\n"
    assert guard.plan(guard.current()) == []
    current.write_text("a log line\n")  # supervisord's own file stays
    assert guard.plan(guard.current()) == []
