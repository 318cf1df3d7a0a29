"""The rpm, checked as far as a Debian machine can: rpmlint, then its scriptlets.

No EL system runs here, so the rpm goes into an rpm database inside a clean Debian
root (`rpm --root DIR --dbpath /var/lib/rpm`, `--nodeps`): rpm chroots there to run
%pre, %post, %preun, %postun and %posttrans with the root's /bin/sh and useradd.
apt first adds python3.11, nginx-light and docker-registry (what EL's python3.11, nginx
and registry packages stand for, at the paths the appliance runs), so the admin can
reconfigure between install and upgrade and the upgrade and erase scriptlets meet a
configured host with running services. Everything runs in private mount, pid and
network namespaces held open between steps (IsolatedRoot of the deb test). What this
cannot show (dnf resolving the EL dependencies, EL's own nginx and registry builds,
SELinux) is listed in packaging/README.md.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.package.test_package_build import NEXT_CONFIG_NOTE, PACKAGING, default_build, next_build
from tests.package.test_package_deb import (
    ROOT_PATH,
    Host,
    IsolatedRoot,
    admin_settings,
    apt_with_network,
    make_clean_root,
)

pytestmark = pytest.mark.package

CONFIG = "etc/appliance/appliance.yml"
ACCOUNTS = ("appliance-registry", "appliance-auth", "appliance-www")
NEXT_STEP = "appliance: Edit /etc/appliance/appliance.yml, then run: sudo appliance-ctl reconfigure"
CLI_BYTECODE = (
    "opt/appliance/embedded/lib/python3.11/site-packages/appliance/__pycache__/cli.cpython-311.pyc"
)


def query(package: Path, *args: str) -> str:
    return subprocess.run(
        ["rpm", "-qp", *args, str(package)], capture_output=True, text=True, check=True
    ).stdout


def test_rpm_metadata():
    rpm = default_build().rpm
    requires = query(rpm, "--requires").splitlines()
    for name in ("nginx", "python3.11", "(docker-distribution or distribution)", "shadow-utils"):
        assert name in requires
    assert (
        query(rpm, "--queryformat", "%{VERSION}-%{RELEASE} %{ARCH}")
        == f"{default_build().version}-1 x86_64"
    )
    flags = dict(
        line.split(" ", 1)
        for line in query(rpm, "--queryformat", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines()
    )
    assert flags["/etc/appliance/appliance.yml"] == "cn"  # %config(noreplace)
    files = query(rpm, "-l").splitlines()
    assert "/usr/lib/systemd/system/appliance-runsvdir.service" in files
    assert "/usr/bin/appliance-ctl" in files
    assert not [f for f in files if f in ("/opt", "/usr", "/usr/bin", "/etc")]
    scripts = query(rpm, "--scripts")
    for name in ("preinstall", "postinstall", "preuninstall", "postuninstall", "posttrans"):
        assert f"{name} scriptlet (using /bin/sh):" in scripts


def test_rpmlint_is_clean_apart_from_documented_filters():
    result = subprocess.run(
        ["rpmlint", "-r", str(PACKAGING / "appliance.rpmlintrc"), str(default_build().rpm)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 errors, 0 warnings" in result.stdout, result.stdout
    rules = (PACKAGING / "appliance.rpmlintrc").read_text().split("\n\n")
    for block in rules[1:]:  # every filter carries its reason above it
        assert block.lstrip().startswith("#"), block


@dataclass
class RpmRoot:
    """An rpm database in a clean root, seen from private namespaces (IsolatedRoot)
    that stay up between steps, so services started in one step are there for the
    scriptlets of the next."""

    host: Host

    @property
    def root(self) -> Path:
        return self.host.system.root

    def rpm(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                *self.host.system.enter(chroot=False),
                "rpm",
                "--root",
                str(self.root),
                "--dbpath",
                "/var/lib/rpm",
                *args,
            ],
            capture_output=True,
            text=True,
            env={"PATH": ROOT_PATH, "LANG": "C.UTF-8"},
            timeout=300,
        )

    def path(self, path: str) -> Path:
        return self.root / path

    def account(self, name: str) -> list[str] | None:
        for line in self.path("etc/passwd").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":")
        return None


@pytest.fixture(scope="module")
def rpm_root() -> Iterator[RpmRoot]:
    default_build(), next_build()
    parent = Path(tempfile.mkdtemp(prefix="appliance-rpm-"))
    system = None
    try:
        root = make_clean_root(parent)
        # What EL's python3.11, nginx and registry packages would provide; Debian's
        # builds at the paths reconfigure runs (/usr/sbin/nginx, /usr/bin/docker-registry).
        apt_with_network(
            root,
            "install",
            "--no-install-recommends",
            "python3.11",
            "nginx-light",
            "docker-registry",
        )
        system = IsolatedRoot(root)
        system.start()
        rpm_root = RpmRoot(Host(system=system, v1=default_build().version, v2=next_build().version))
        result = rpm_root.rpm("--initdb")
        assert result.returncode == 0, result.stderr
        yield rpm_root
    finally:
        if system is not None:
            system.stop()
        shutil.rmtree(parent, ignore_errors=True)


def test_install_runs_the_scriptlets(rpm_root: RpmRoot):
    result = rpm_root.rpm("-ivh", "--nodeps", str(default_build().rpm))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scriptlet failed" not in result.stderr, result.stderr
    assert NEXT_STEP in result.stdout.splitlines()
    assert (
        rpm_root.rpm("-q", "appliance").stdout.strip()
        == f"appliance-{default_build().version}-1.x86_64"
    )

    for name in ACCOUNTS:  # %pre
        entry = rpm_root.account(name)
        assert entry is not None, name
        assert entry[5] == "/var/opt/appliance" and entry[6] == "/usr/sbin/nologin"
    assert rpm_root.path("var/opt/appliance").is_dir()  # %post
    assert rpm_root.path("var/log/appliance").is_dir()
    assert rpm_root.path(CLI_BYTECODE).is_file()
    config = rpm_root.path(CONFIG)
    assert config.read_text() == default_build().shipped_config
    assert config.stat().st_mode & 0o777 == 0o600
    assert not {"supervisord", "nginx"} & set(rpm_root.host.system.process_names())


def test_admin_configures_the_host(rpm_root: RpmRoot):
    config = rpm_root.path(CONFIG)
    rpm_root.host.admin_config = config.read_text() + admin_settings(rpm_root.host.password)
    config.write_text(rpm_root.host.admin_config)
    result = rpm_root.host.ctl("reconfigure", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rpm_root.host.wait_until_running()


def test_upgrade_keeps_the_edited_config_leaves_rpmnew_and_reconfigures(rpm_root: RpmRoot):
    host = rpm_root.host
    assert host.admin_config, "needs the configured host of the step before"
    before = host.pids()
    result = rpm_root.rpm("-Uvh", "--nodeps", str(next_build().rpm))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scriptlet failed" not in result.stderr, result.stderr
    assert (
        rpm_root.rpm("-q", "appliance").stdout.strip()
        == f"appliance-{next_build().version}-1.x86_64"
    )
    config = rpm_root.path(CONFIG)
    assert config.read_text() == host.admin_config
    assert rpm_root.path(CONFIG + ".rpmnew").read_text().endswith(NEXT_CONFIG_NOTE)
    # The old version's %preun left the new version's bytecode alone.
    assert rpm_root.path(CLI_BYTECODE).is_file()

    # %posttrans, after the old files were gone: reconfigure, then the token service
    # onto the new code; nginx and the registry keep running.
    assert (
        "appliance: upgraded a configured host; running appliance-ctl reconfigure" in result.stdout
    )
    assert not rpm_root.path("var/opt/appliance/.reconfigure-after-package-upgrade").exists()
    host.wait_until_running()
    after = host.pids()
    assert after["auth"] != before["auth"]
    assert (after["nginx"], after["registry"]) == (before["nginx"], before["registry"])


def test_erase_stops_everything_keeps_data_and_the_edited_config_as_rpmsave(rpm_root: RpmRoot):
    result = rpm_root.rpm("-e", "appliance")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scriptlet failed" not in result.stderr, result.stderr
    assert rpm_root.rpm("-q", "appliance").returncode != 0
    assert rpm_root.path(CONFIG + ".rpmsave").read_text() == rpm_root.host.admin_config
    rpm_root.host.system.wait_until_stopped()
    # %preun removed the bytecode, so nothing is left of the package's tree.
    assert not rpm_root.path("opt/appliance").exists()
    assert rpm_root.path("etc/appliance/appliance-secrets.json").is_file()
    assert rpm_root.path("var/opt/appliance/supervisor/supervisord.conf").is_file()
    for name in ACCOUNTS:
        assert rpm_root.account(name) is not None
