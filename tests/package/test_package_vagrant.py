"""The Vagrantfile, read by machine since no VM runs here.

Ruby loads it against a small stand-in for Vagrant's DSL that records each box and
its provisioners; the tests then check what a `vagrant up` would do: which package
each box gets, that the provisioning scripts are valid bash, and that the settings
they append to the shipped example config are accepted by `appliance-ctl`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.package.test_package_build import REPO

pytestmark = pytest.mark.package

DSL = r"""
require "json"
$boxes = {}
class Recorder
  def initialize(box) = (@box = box)
  def define(name)
    $boxes[name] = {"provisioners" => [], "ports" => []}
    yield Recorder.new($boxes[name])
  end
  def provision(kind, **options)
    @box["provisioners"] << {"kind" => kind}.merge(options.transform_keys(&:to_s))
  end
  def network(kind, **options)
    @box["ports"] << options.transform_keys(&:to_s) if kind == "forwarded_port"
  end
  def box=(name)
    @box["box"] = name
  end
  def provider(*) = nil
  def synced_folder(*, **) = nil
  def method_missing(*) = self
  def respond_to_missing?(*) = true
end
module Vagrant
  def self.configure(_version) = yield(Recorder.new({}))
end
load ARGV[0]
puts JSON.generate($boxes)
"""


def load_vagrantfile(directory: Path) -> dict:
    shutil.copy(REPO / "Vagrantfile", directory / "Vagrantfile")
    result = subprocess.run(
        ["ruby", "-e", DSL, str(directory / "Vagrantfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def boxes(tmp_path: Path) -> dict:
    out = tmp_path / "packaging/out"
    out.mkdir(parents=True)
    for name, age in (
        ("appliance_0.9_amd64.deb", 100),
        ("appliance_1.0_amd64.deb", 0),
        ("appliance-0.9-1.x86_64.rpm", 100),
        ("appliance-1.0-1.x86_64.rpm", 0),
    ):
        (out / name).write_bytes(b"")
        os.utime(out / name, (1e9 - age, 1e9 - age))
    return load_vagrantfile(tmp_path)


def shell_script(box: dict) -> str:
    return next(p["inline"] for p in box["provisioners"] if p["kind"] == "shell")


def test_a_debian_12_and_a_rocky_9_box_each_get_the_newest_package(boxes: dict):
    assert boxes["debian12"]["box"] == "debian/bookworm64"
    assert boxes["rocky9"]["box"] == "rockylinux/9"
    uploads = {
        name: next(p for p in box["provisioners"] if p["kind"] == "file")
        for name, box in boxes.items()
    }
    assert Path(uploads["debian12"]["source"]).name == "appliance_1.0_amd64.deb"
    assert Path(uploads["rocky9"]["source"]).name == "appliance-1.0-1.x86_64.rpm"
    assert f"apt-get install -y -q curl {uploads['debian12']['destination']}" in shell_script(
        boxes["debian12"]
    )
    assert f"dnf install -y -q {uploads['rocky9']['destination']}" in shell_script(boxes["rocky9"])
    host_ports = [port["host"] for box in boxes.values() for port in box["ports"]]
    assert len(host_ports) == len(set(host_ports)) == 2


@pytest.mark.parametrize("name", ["debian12", "rocky9"])
def test_provisioning_script_is_bash_that_reconfigures_and_checks(
    boxes: dict, name: str, tmp_path: Path
):
    script = shell_script(boxes[name])
    assert script.startswith("#!/bin/bash\nset -eu\n")
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert "\nappliance-ctl reconfigure\n" in script
    assert "https://localhost:5050/v2/" in script


def test_appended_settings_are_a_valid_config(boxes: dict, tmp_path: Path):
    script = shell_script(boxes["debian12"])
    appended = re.search(r"<<'YAML'\n(.*?)\nYAML\n", script, re.S).group(1)
    example = subprocess.run(
        [str(REPO / ".venv/bin/appliance-ctl"), "example-config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = tmp_path / "appliance.yml"
    config.write_text(example + appended + "\n")
    shown = subprocess.run(
        [str(REPO / ".venv/bin/appliance-ctl"), "-c", str(config), "show-config"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "registry_external_url: https://localhost:5050" in shown.stdout


def test_without_a_package_the_provisioning_fails_with_the_build_command(tmp_path: Path):
    boxes = load_vagrantfile(tmp_path)
    for box in boxes.values():
        assert [p["kind"] for p in box["provisioners"]][0] == "shell"
        first = box["provisioners"][0]["inline"]
        assert "run packaging/build" in first and "exit 1" in first
