"""The deb as an admin meets it, in a clean Debian 12 root.

`packaging/clean-root` unpacks a cached `debootstrap --variant=minbase bookworm` root
(with a policy-rc.d that forbids starting daemons). The tests below run in file order
against one such root, inside private mount, pid and network namespaces (only `lo`,
brought up): install with apt, reconfigure, push with skopeo over loopback, upgrade to
a higher version, remove, purge.

apt needs the Debian archive for the dependencies (nginx-light, docker-registry,
python3), and the isolated network has none: the fixture first runs
`apt-get install --download-only` in the same root with the host's network (mount and
pid namespaces only; the .debs are kept in packaging/cache/apt-archives for the next
run), then every step of the tests runs offline inside the network namespace (apt
finds every .deb in its cache).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.package.test_package_build import NEXT_CONFIG_NOTE, PACKAGING, default_build, next_build
from tests.support.oci import build_image
from tests.support.skopeo import Skopeo, SkopeoError

pytestmark = pytest.mark.package

CACHE = Path(os.environ.get("APPLIANCE_PACKAGING_CACHE", PACKAGING / "cache"))
ARCHIVES = CACHE / "apt-archives"
PACKAGES_IN_ROOT = "/var/tmp/packages"
CONFIG = "/etc/appliance/appliance.yml"
ACCOUNTS = ("appliance-registry", "appliance-auth", "appliance-www")
# What the appliance runs; none of it may outlive a remove.
APPLIANCE_PROCESSES = {"supervisord", "nginx", "docker-registry"}
NEXT_STEP = "Edit /etc/appliance/appliance.yml, then run: sudo appliance-ctl reconfigure"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# pid 1 of the namespaces: reaps every orphan (a daemonizing supervisord leaves one),
# as init does on a real host, so "is that pid gone" means what it says.
REAPER = """
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""


class IsolatedRoot:
    """A chroot directory seen from private mount, pid and network namespaces.

    A reaping pid 1 holds the namespaces open between steps; each step enters them with
    nsenter, so the daemons one step starts (supervisord, nginx, the registry) are
    still there for the next, and everything dies with pid 1 at the end.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.holder: subprocess.Popen | None = None
        self.pid = 0

    def start(self) -> None:
        r = self.root
        setup = f"""
            set -e
            ip link set lo up
            mount -t proc proc /proc
            mount -t proc proc {r}/proc
            mount -t tmpfs -o mode=0755 tmpfs {r}/run
            mkdir -p {r}/dev/shm && mount -t tmpfs -o mode=1777 tmpfs {r}/dev/shm
            mkdir -p {r}/dev/pts && mount -t devpts -o newinstance,ptmxmode=0666 devpts {r}/dev/pts
            echo ready
            exec /usr/bin/python3 -c '{REAPER}'
        """
        # unshare complains on stderr when its pid 1 is killed at the end: keep its
        # stderr for a failed set-up only.
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--net", "--fork", "--", "sh", "-c", setup],
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.wait(timeout=30)
            self.errors.seek(0)
            raise AssertionError(f"namespace set-up failed: {self.errors.read()}")
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children")
        self.pid = int(children.read_text().split()[0])

    def stop(self) -> None:
        if self.holder is None:
            return
        try:
            os.kill(self.pid, 9)  # pid 1 of the namespace: the kernel kills the rest
        except ProcessLookupError:
            pass
        self.holder.wait(timeout=30)
        self.holder = None
        self.errors.close()

    def enter(self, chroot: bool = True) -> list[str]:
        prefix = ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "--"]
        return prefix + (["chroot", str(self.root)] if chroot else [])

    def run(
        self, *argv: str, chroot: bool = True, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        environment = {
            "PATH": ROOT_PATH,
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "DEBIAN_FRONTEND": "noninteractive",
        }
        result = subprocess.run(
            [*self.enter(chroot), *argv],
            capture_output=True,
            text=True,
            env=environment,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def process_names(self) -> list[str]:
        """Names of the processes in the namespace (pid 1, the reaper, aside)."""
        names = []
        for entry in Path(f"/proc/{self.pid}/root/proc").iterdir():
            if entry.name.isdigit() and entry.name != "1":
                try:
                    names.append((entry / "comm").read_text().strip())
                except OSError:
                    pass
        return names

    def wait_until_stopped(self, timeout: float = 10) -> None:
        """Until none of the appliance's processes runs in the namespace any more."""
        deadline = time.monotonic() + timeout
        while APPLIANCE_PROCESSES & set(self.process_names()):
            assert time.monotonic() < deadline, self.process_names()
            time.sleep(0.2)

    def path(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def apt_with_network(root: Path, *args: str) -> None:
    """`apt-get -y ARGS` in the root with the host's network (mount and pid namespaces
    only). apt's .debs are shared with other roots through the cache directory:
    hard-linked in before, new ones copied back after (each root keeps its own apt
    locks, so two test runs do not wait on each other)."""
    ARCHIVES.mkdir(parents=True, exist_ok=True)
    archives = root / "var/cache/apt/archives"
    apt = f"chroot {root} apt-get -q -y " + " ".join(args)
    script = f"""
        set -e
        cp -l {ARCHIVES}/*.deb {archives}/ 2>/dev/null || cp {ARCHIVES}/*.deb {archives}/ \
            2>/dev/null || true
        mount -t proc proc {root}/proc
        cp /etc/resolv.conf {root}/etc/resolv.conf
        if ! {apt} >/dev/null 2>&1; then
            chroot {root} apt-get -q update >/dev/null
            {apt}
        fi
        cp -n {archives}/*.deb {ARCHIVES}/ 2>/dev/null || true
    """
    result = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": ROOT_PATH, "DEBIAN_FRONTEND": "noninteractive"},
        timeout=600,
    )
    assert result.returncode == 0, f"apt-get {' '.join(args)} failed:\n{result.stderr}"


def fetch_dependencies(root: Path, deb: str) -> None:
    """Download what `apt-get install deb` needs, so the install itself runs offline."""
    apt_with_network(root, "install", "--download-only", deb)


def make_clean_root(parent: Path) -> Path:
    root = parent / "root"
    result = subprocess.run(
        [str(PACKAGING / "clean-root"), str(root)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"packaging/clean-root failed:\n{result.stderr}"
    return root


@dataclass
class Host:
    """The clean root with the packages copied in, and what the steps learn on the way."""

    system: IsolatedRoot
    v1: str
    v2: str
    admin_config: str = ""
    password: str = "package-test-password"
    pushed_digest: str | None = None
    upgrade_output: str = ""
    pids_before_upgrade: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def apt(self, *args: str) -> subprocess.CompletedProcess:
        return self.system.run("apt-get", "-q", "-y", *args, check=False)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.system.run("appliance-ctl", *args, check=check)

    def skopeo(self, home: Path) -> Skopeo:
        cert_dir = home / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.system.path("/etc/appliance/ssl/localhost.crt"), cert_dir / "ca.crt")
        return NamespacedSkopeo(
            home=home,
            registry=f"localhost:{REGISTRY_PORT}",
            username="root",
            password=self.password,
            cert_dir=cert_dir,
            enter=tuple(self.system.enter(chroot=False)),
        )

    def pids(self) -> dict[str, int]:
        """Service name -> pid, from `appliance-ctl status`."""
        out = {}
        for line in self.ctl("status", check=False).stdout.splitlines():
            if line.startswith("run: ") and "(pid " in line:
                out[line.split(":")[1].strip()] = int(line.split("(pid ")[1].split(")")[0])
        return out

    def wait_until_running(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = self.ctl("status", check=False).stdout
            running = {
                line.split(":")[1].strip()
                for line in status.splitlines()
                if line.startswith("run: ")
            }
            if {"nginx", "registry", "auth"} <= running:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"services not running after {timeout}s:\n{status}")
            time.sleep(0.3)


@dataclass
class NamespacedSkopeo(Skopeo):
    """skopeo from the host's filesystem, run inside the appliance's network namespace."""

    enter: tuple[str, ...] = ()

    def run(self, *args: str) -> subprocess.CompletedProcess:
        argv = [*self.enter, "skopeo", "--insecure-policy", *args]
        result = subprocess.run(
            argv, env=self.environment(), capture_output=True, text=True, timeout=self.timeout
        )
        if result.returncode != 0:
            raise SkopeoError(list(args), result)
        return result


HTTP_PORT = 8080
REGISTRY_PORT = 5050


def admin_settings(password: str) -> str:
    """What an admin appends to the shipped example: ports of their choosing (the
    namespace has its own loopback, so any port is free), loopback only."""
    return yaml.safe_dump(
        {
            "external_url": "https://localhost",
            "registry_external_url": f"https://localhost:{REGISTRY_PORT}",
            "initial_root_password": password,
            "nginx": {"http_port": HTTP_PORT, "listen_addresses": ["127.0.0.1"]},
            "registry_nginx": {"listen_port": REGISTRY_PORT},
        },
        sort_keys=False,
    )


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    v1, v2 = default_build(), next_build()
    parent = Path(tempfile.mkdtemp(prefix="appliance-deb-"))
    system = None
    try:
        root = make_clean_root(parent)
        packages = root / PACKAGES_IN_ROOT.lstrip("/")
        packages.mkdir(parents=True)
        for build in (v1, v2):
            shutil.copy(build.deb, packages)
        fetch_dependencies(root, f"{PACKAGES_IN_ROOT}/{v1.deb.name}")
        system = IsolatedRoot(root)
        system.start()
        yield Host(system=system, v1=v1.version, v2=v2.version)
    finally:
        if system is not None:
            system.stop()
        shutil.rmtree(parent, ignore_errors=True)


def dpkg_status(host: Host) -> tuple[str, str]:
    result = host.system.run(
        "dpkg-query", "-W", "-f=${Status}|${Version}", "appliance", check=False
    )
    status, _, version = result.stdout.partition("|")
    return status, version


def account(host: Host, name: str) -> list[str] | None:
    result = host.system.run("getent", "passwd", name, check=False)
    return result.stdout.strip().split(":") if result.returncode == 0 else None


def test_deb_metadata():
    deb = default_build().deb
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends", "Architecture"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "nginx-light | nginx" in fields
    assert "docker-registry" in fields
    assert "python3 (>= 3.11), python3 (<< 3.12)" in fields
    assert "Architecture: amd64" in fields
    assert (
        subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        == default_build().version
    )
    conffiles = subprocess.run(
        ["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert conffiles == [CONFIG]
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    assert "./usr/bin/appliance-ctl -> /opt/appliance/embedded/bin/appliance-ctl" in listing
    assert "./lib/systemd/system/appliance-runsvdir.service" in listing
    assert "-rw------- root/root" in next(
        line for line in listing.splitlines() if line.endswith("./etc/appliance/appliance.yml")
    )


def test_systemd_unit_starts_supervisord_with_reconfigures_config():
    unit = (PACKAGING / "appliance-runsvdir.service").read_text()
    assert (
        "ExecStart=/opt/appliance/embedded/bin/supervisord -n "
        "-c /var/opt/appliance/supervisor/supervisord.conf"
    ) in unit
    assert "ConditionPathExists=/var/opt/appliance/supervisor/supervisord.conf" in unit
    assert "WantedBy=multi-user.target" in unit


def test_lintian_is_clean_apart_from_documented_overrides():
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(default_build().deb)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert result.returncode == 0 and tags == [], result.stdout + result.stderr
    overrides = (PACKAGING / "lintian-overrides").read_text().split("\n\n")
    for block in overrides[1:]:  # every override carries its reason above it
        assert block.lstrip().startswith("#"), block


def test_install_on_clean_debian_starts_nothing_and_says_what_next(host: Host):
    started = time.monotonic()
    result = host.apt("install", f"{PACKAGES_IN_ROOT}/appliance_{host.v1}_amd64.deb")
    host.timings["install"] = time.monotonic() - started
    host.timings["install_started"] = started
    assert result.returncode == 0, result.stdout + result.stderr
    ours = [line for line in result.stdout.splitlines() if line.startswith("appliance:")]
    assert ours == [f"appliance: {NEXT_STEP}"]

    assert dpkg_status(host) == ("install ok installed", host.v1)
    for name in ("nginx-light", "docker-registry"):
        assert (
            host.system.run("dpkg-query", "-W", "-f=${Status}", name).stdout
            == "install ok installed"
        )
    for name in ACCOUNTS:
        entry = account(host, name)
        assert entry is not None, name
        assert int(entry[2]) < 1000 and entry[5] == "/var/opt/appliance"
        assert entry[6] == "/usr/sbin/nologin"

    config = host.system.path(CONFIG)
    assert config.read_text() == default_build().shipped_config
    assert config.stat().st_mode & 0o777 == 0o600
    assert host.system.path("/var/opt/appliance").is_dir()
    assert host.system.path("/var/log/appliance").is_dir()
    assert host.system.path("/lib/systemd/system/appliance-runsvdir.service").is_file()

    # Runs from /usr/bin with bytecode postinst compiled at the final path.
    assert host.ctl("example-config").stdout == default_build().shipped_config
    cached = host.system.run(
        "/opt/appliance/embedded/bin/python",
        "-c",
        "import appliance.cli as m, os; print(m.__cached__, os.path.exists(m.__cached__))",
    ).stdout.split()
    assert cached[0].startswith("/opt/appliance/embedded/lib/python3.11/site-packages/")
    assert cached[1] == "True"

    # Nothing started: no supervisord, nginx or registry before the admin reconfigures.
    assert not APPLIANCE_PROCESSES & set(host.system.process_names())


def test_admin_edits_the_config(host: Host):
    config = host.system.path(CONFIG)
    host.admin_config = (
        config.read_text() + "\n# --- the admin's settings ---\n" + admin_settings(host.password)
    )
    config.write_text(host.admin_config)
    effective = yaml.safe_load(host.ctl("show-config").stdout)
    assert effective["registry_nginx"]["listen_port"] == REGISTRY_PORT
    assert effective["nginx"]["http_port"] == HTTP_PORT


def test_reconfigure_then_push_over_loopback(host: Host, tmp_path: Path):
    result = host.ctl("reconfigure", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    host.wait_until_running()
    # What the Vagrantfile checks on its boxes: the registry answers through nginx and
    # wants a token.
    answer = subprocess.run(
        [
            *host.system.enter(chroot=False),
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"https://localhost:{REGISTRY_PORT}/v2/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert answer.stdout == "401", answer

    client = host.skopeo(tmp_path / "client")
    image = build_image(tmp_path / "image", tag="v1", random_bytes=64 * 1024)
    client.push(image, "root/hello", "v1")
    host.timings["install_to_first_push"] = time.monotonic() - host.timings["install_started"]
    host.pushed_digest = client.digest("root/hello", "v1")
    assert host.pushed_digest == image.manifest_digest


def test_upgraded_system_nginx_restarts_only_our_nginx(host: Host, tmp_path: Path):
    """apt upgrading nginx activates the deb's file trigger on /usr/sbin/nginx."""
    assert host.pushed_digest, "needs the running services of the step before"
    before = host.pids()
    host.system.run("dpkg-trigger", "--by-package=nginx", "--no-await", "/usr/sbin/nginx")
    result = host.system.run("dpkg", "--triggers-only", "--pending")
    assert "appliance: /usr/sbin/nginx was upgraded; restarting nginx" in result.stdout
    host.wait_until_running()
    after = host.pids()
    assert after["nginx"] != before["nginx"]
    assert after["registry"] == before["registry"] and after["auth"] == before["auth"]
    assert host.skopeo(tmp_path / "client").digest("root/hello", "v1") == host.pushed_digest


def test_upgrade_keeps_the_admins_config(host: Host):
    assert host.admin_config, "needs the admin's edit of the step before"
    host.pids_before_upgrade = host.pids()
    result = host.apt(
        "-o",
        "Dpkg::Options::=--force-confold",
        "install",
        f"{PACKAGES_IN_ROOT}/appliance_{host.v2}_amd64.deb",
    )
    host.upgrade_output = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert dpkg_status(host) == ("install ok installed", host.v2)
    # The admin's edit stays; the new shipped example waits beside it.
    assert host.system.path(CONFIG).read_text() == host.admin_config
    assert host.system.path(CONFIG + ".dpkg-dist").read_text().endswith(NEXT_CONFIG_NOTE)


def test_upgrade_reconfigures_a_configured_host_and_keeps_its_images(host: Host, tmp_path: Path):
    assert host.pushed_digest, "needs the configured host and pushed image of the steps before"
    assert (
        "appliance: upgraded a configured host; running appliance-ctl reconfigure"
        in host.upgrade_output
    )
    host.wait_until_running()
    # The token service runs the package's own code: restarted onto the new version.
    # nginx and the registry run the system's binaries: left alone.
    after = host.pids()
    assert after["auth"] != host.pids_before_upgrade["auth"]
    assert after["nginx"] == host.pids_before_upgrade["nginx"]
    assert after["registry"] == host.pids_before_upgrade["registry"]
    client = host.skopeo(tmp_path / "client")
    assert client.digest("root/hello", "v1") == host.pushed_digest


def test_remove_stops_everything_and_keeps_config_and_accounts(host: Host):
    result = host.apt("remove", "appliance")
    assert result.returncode == 0, result.stdout + result.stderr
    assert dpkg_status(host)[0] == "deinstall ok config-files"

    host.system.wait_until_stopped()
    assert not host.system.path("/opt/appliance").exists()
    assert not host.system.path("/usr/bin/appliance-ctl").exists()
    assert host.system.path(CONFIG).read_text() == host.admin_config
    assert host.system.path("/var/opt/appliance").is_dir()
    for name in ACCOUNTS:
        assert account(host, name) is not None


def test_removed_host_keeps_its_images_and_secrets(host: Host):
    assert host.pushed_digest, "needs the pushed image of the steps before"
    assert host.system.path("/etc/appliance/appliance-secrets.json").is_file()
    assert host.system.path(
        "/var/opt/appliance/registry/data/docker/registry/v2/repositories/root/hello"
    ).is_dir()


def test_purge_deletes_data_config_and_accounts(host: Host):
    result = host.system.run("dpkg", "--purge", "appliance", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert dpkg_status(host)[0] in ("", "unknown ok not-installed")
    for path in ("/var/opt/appliance", "/var/log/appliance", "/etc/appliance"):
        assert not host.system.path(path).exists(), path
    for name in ACCOUNTS:
        assert account(host, name) is None
        assert host.system.run("getent", "group", name, check=False).returncode != 0
    # The system's packages stay installed.
    for name in ("nginx-light", "docker-registry"):
        assert (
            host.system.run("dpkg-query", "-W", "-f=${Status}", name).stdout
            == "install ok installed"
        )
