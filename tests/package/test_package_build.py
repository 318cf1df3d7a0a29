"""`packaging/build`: one command, one staged tree, a deb and an rpm.

Also the build helpers the deb and rpm tests share: each distinct build runs once per
test session (about 15 s each with a warm wheelhouse) into a directory of its own
under packaging/out/, removed when the session ends.
"""

from __future__ import annotations

import atexit
import configparser
import functools
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.package

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
EMBEDDED = "opt/appliance/embedded"
SITE_PACKAGES = f"{EMBEDDED}/lib/python3.11/site-packages"

# The next version ships a changed example config, so an upgrade meets an admin's
# edit and a new packaged file at once (dpkg's .dpkg-dist, rpm's .rpmnew).
NEXT_CONFIG_NOTE = "# (next version) a changed line in the shipped example\n"


def project_version() -> str:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser["metadata"]["version"]


@dataclass(frozen=True)
class Build:
    version: str
    out: Path
    seconds: float

    @property
    def deb(self) -> Path:
        return self.out / f"appliance_{self.version}_amd64.deb"

    @property
    def rpm(self) -> Path:
        return self.out / f"appliance-{self.version}-1.x86_64.rpm"

    @property
    def stage(self) -> Path:
        return self.out / "stage"

    @property
    def shipped_config(self) -> str:
        """The /etc/appliance/appliance.yml the packages carry."""
        return (self.out / "build" / "appliance.yml").read_text()


def run_build(out: Path, *args: str) -> Build:
    started = time.monotonic()
    result = subprocess.run(
        [str(PACKAGING / "build"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, f"packaging/build failed:\n{result.stdout}\n{result.stderr}"
    packages = result.stdout.split()
    version = Path(packages[0]).name.split("_")[1]
    return Build(version=version, out=out, seconds=seconds)


@functools.cache
def builds_dir() -> Path:
    """This session's builds (two test runs at once must not share a staging tree)."""
    (PACKAGING / "out").mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="test-", dir=PACKAGING / "out"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def default_build() -> Build:
    """`packaging/build` as documented: the project's version, the example config."""
    return run_build(builds_dir() / "default")


@functools.cache
def next_build() -> Build:
    """A higher version whose shipped example config differs from the default build's."""
    config = builds_dir() / "next-appliance.yml"
    config.write_text(default_build().shipped_config + NEXT_CONFIG_NOTE)
    return run_build(
        builds_dir() / "next", "--version", f"{default_build().version}.1", "--config", str(config)
    )


def staged_files(stage: Path) -> list[Path]:
    return [p for p in stage.rglob("*") if p.is_file() and not p.is_symlink()]


def test_one_command_builds_both_packages_named_by_the_project_version():
    build = default_build()
    assert build.version == project_version()
    assert build.deb.is_file() and build.rpm.is_file()
    print(f"build: {build.seconds:.1f}s")


def test_staged_tree_names_no_build_path():
    build = default_build()
    needles = [str(REPO).encode(), str(build.out).encode()]
    stale = [
        str(p.relative_to(build.stage))
        for p in staged_files(build.stage)
        if any(needle in p.read_bytes() for needle in needles)
    ]
    assert stale == []


def test_embedded_environment_is_built_for_its_final_path():
    stage = default_build().stage
    pyvenv = (stage / EMBEDDED / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in pyvenv
    assert "/opt/appliance/embedded" in pyvenv
    assert (stage / EMBEDDED / "bin/python3.11").readlink() == Path("/usr/bin/python3.11")
    for script in ("appliance-ctl", "appliance-auth", "supervisord"):
        first_line = (stage / EMBEDDED / "bin" / script).read_text().splitlines()[0]
        assert first_line == "#!/opt/appliance/embedded/bin/python"
    # .pyc files are made by postinst at the final path, never shipped.
    assert not [p for p in stage.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"]
    # The project came in as a wheel, not as a link to a checkout.
    site = stage / SITE_PACKAGES
    assert (site / "appliance" / "cli.py").is_file()
    assert (site / "recipes" / "__init__.py").is_file()
    assert not list(site.glob("*.egg-link")) and not list(site.glob("__editable__*"))


def test_templates_are_installed_where_the_code_looks_for_them():
    stage = default_build().stage
    shipped = stage / EMBEDDED / "share/appliance/files"
    repo_files = sorted(
        str(p.relative_to(REPO / "files"))
        for p in (REPO / "files").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert repo_files
    assert sorted(str(p.relative_to(shipped)) for p in staged_files(shipped)) == repo_files


def test_shipped_config_is_the_commented_example():
    build = default_build()
    example = subprocess.run(
        [str(REPO / ".venv/bin/appliance-ctl"), "example-config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert build.shipped_config == example


def test_embedded_project_is_the_working_tree():
    """What was installed is the copy of the working tree the build took (the live
    tree may have moved on since), not an older wheel of the same version."""
    site = default_build().stage / SITE_PACKAGES
    copy = default_build().out / "build/src"
    for package in ("appliance", "recipes"):
        source = {
            str(p.relative_to(copy / package)): p.read_bytes()
            for p in (copy / package).rglob("*.py")
        }
        installed = {
            str(p.relative_to(site / package)): p.read_bytes()
            for p in (site / package).rglob("*.py")
        }
        assert installed.keys() == source.keys(), package
        assert [name for name in source if installed[name] != source[name]] == [], package
