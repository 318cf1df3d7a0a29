"""The rpm, checked as far as a Debian machine can: rpmlint, then its scriptlets.

No EL system runs here, so the rpm goes into an rpm database inside a clean Debian
root (`rpm --root DIR --dbpath /var/lib/rpm`, `--nodeps`): rpm chroots there to run
%pre, %post, %preun, %postun and %posttrans with the root's /bin/sh, useradd and
python3.11 (apt puts that in first; EL's python3.11 has the same path). Each rpm call
runs in private mount, pid and network namespaces. What this cannot show (dnf
resolving the EL dependencies, EL's nginx and registry under reconfigure, SELinux)
is listed in packaging/README.md.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_package_build import NEXT_CONFIG_NOTE, PACKAGING, default_build, next_build
from tests.test_package_deb import ROOT_PATH, apt_with_network, make_clean_root

pytestmark = pytest.mark.package

CONFIG = "etc/appliance/appliance.yml"
ACCOUNTS = ("appliance-registry", "appliance-auth", "appliance-www")
NEXT_STEP = "appliance: Edit /etc/appliance/appliance.yml, then run: sudo appliance-ctl reconfigure"
CLI_BYTECODE = ("opt/appliance/embedded/lib/python3.11/site-packages/appliance/"
                "__pycache__/cli.cpython-311.pyc")


def query(package: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(package)], capture_output=True, text=True,
                          check=True).stdout


def test_rpm_metadata():
    rpm = default_build().rpm
    requires = query(rpm, "--requires").splitlines()
    for name in ("nginx", "python3.11", "(docker-distribution or distribution)", "shadow-utils"):
        assert name in requires
    assert query(rpm, "--queryformat", "%{VERSION}-%{RELEASE} %{ARCH}") == \
        f"{default_build().version}-1 x86_64"
    flags = dict(line.split(" ", 1) for line in query(
        rpm, "--queryformat", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines())
    assert flags["/etc/appliance/appliance.yml"] == "cn"  # %config(noreplace)
    files = query(rpm, "-l").splitlines()
    assert "/usr/lib/systemd/system/appliance-runsvdir.service" in files
    assert "/usr/bin/appliance-ctl" in files
    assert not [f for f in files if f in ("/opt", "/usr", "/usr/bin", "/etc")]
    scripts = query(rpm, "--scripts")
    for name in ("preinstall", "postinstall", "preuninstall", "postuninstall", "posttrans"):
        assert f"{name} scriptlet (using /bin/sh):" in scripts


def test_rpmlint_is_clean_apart_from_documented_filters():
    result = subprocess.run(["rpmlint", "-r", str(PACKAGING / "appliance.rpmlintrc"),
                             str(default_build().rpm)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 errors, 0 warnings" in result.stdout, result.stdout
    rules = (PACKAGING / "appliance.rpmlintrc").read_text().split("\n\n")
    for block in rules[1:]:  # every filter carries its reason above it
        assert block.lstrip().startswith("#"), block


@dataclass
class RpmRoot:
    root: Path

    def rpm(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["unshare", "--mount", "--pid", "--net", "--fork", "--",
             "rpm", "--root", str(self.root), "--dbpath", "/var/lib/rpm", *args],
            capture_output=True, text=True, env={"PATH": ROOT_PATH, "LANG": "C.UTF-8"},
            timeout=300)

    def path(self, path: str) -> Path:
        return self.root / path

    def account(self, name: str) -> list[str] | None:
        for line in self.path("etc/passwd").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":")
        return None


def install_python(root: Path) -> None:
    """python3.11 from Debian into the root, where EL's python3.11 package would put
    /usr/bin/python3.11 too."""
    apt_with_network(root, "install", "python3.11")


@pytest.fixture(scope="module")
def rpm_root() -> Iterator[RpmRoot]:
    default_build(), next_build()
    parent = Path(tempfile.mkdtemp(prefix="appliance-rpm-"))
    try:
        root = make_clean_root(parent)
        install_python(root)
        system = RpmRoot(root)
        result = system.rpm("--initdb")
        assert result.returncode == 0, result.stderr
        yield system
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_install_runs_the_scriptlets(rpm_root: RpmRoot):
    result = rpm_root.rpm("-ivh", "--nodeps", str(default_build().rpm))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scriptlet failed" not in result.stderr, result.stderr
    assert NEXT_STEP in result.stdout.splitlines()
    assert rpm_root.rpm("-q", "appliance").stdout.strip() == \
        f"appliance-{default_build().version}-1.x86_64"

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


def test_upgrade_keeps_the_edited_config_and_leaves_rpmnew(rpm_root: RpmRoot):
    config = rpm_root.path(CONFIG)
    edited = config.read_text() + "external_url: https://registry.example.com\n"
    config.write_text(edited)

    result = rpm_root.rpm("-Uvh", "--nodeps", str(next_build().rpm))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scriptlet failed" not in result.stderr, result.stderr
    assert rpm_root.rpm("-q", "appliance").stdout.strip() == \
        f"appliance-{next_build().version}-1.x86_64"
    assert config.read_text() == edited
    assert rpm_root.path(CONFIG + ".rpmnew").read_text().endswith(NEXT_CONFIG_NOTE)
    # The old version's %preun left the new version's bytecode alone.
    assert rpm_root.path(CLI_BYTECODE).is_file()


def test_erase_keeps_data_and_the_edited_config_as_rpmsave(rpm_root: RpmRoot):
    edited = rpm_root.path(CONFIG).read_text()
    result = rpm_root.rpm("-e", "appliance")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scriptlet failed" not in result.stderr, result.stderr
    assert rpm_root.rpm("-q", "appliance").returncode != 0
    assert rpm_root.path(CONFIG + ".rpmsave").read_text() == edited
    # %preun removed the bytecode, so nothing is left of the package's tree.
    assert not rpm_root.path("opt/appliance").exists()
    assert rpm_root.path("var/opt/appliance").is_dir()
    for name in ACCOUNTS:
        assert rpm_root.account(name) is not None
