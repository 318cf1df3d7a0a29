"""What the storage migration's switch writes inside its window (recipes/
storage_migrate.py): the registry's files for the new storage, and nothing that would
close the window early or restart the registry (the window's close hands it over)."""

from __future__ import annotations

from pathlib import Path

import yaml

from appliance import storage_migration
from appliance.registry_storage import FilesystemStorage
from recipes import registry, storage_migrate
from tests.support.recipes import SECRETS, settings_for

S3 = {"s3": {"bucket": "images", "region": "us-east-1"}, "redirect": {"disable": True}}


def switch_for(root: Path, section: dict) -> storage_migrate.StorageSwitch:
    settings = settings_for(root)
    target = root / "target.yml"
    target.write_text(yaml.safe_dump(section))
    found, new = storage_migration.new_settings(settings, target)
    source = FilesystemStorage(root / "old")
    m = storage_migrate.Migration(settings, new, found, source, FilesystemStorage(root / "new"))
    return storage_migrate.StorageSwitch(m, SECRETS)


def test_the_window_writes_the_registrys_config_files_for_the_new_storage(tmp_path):
    switch = switch_for(tmp_path, S3)
    new = switch.migration.new_settings
    files = {resource.path: resource for resource in switch.registry_files()}
    assert set(files) == {
        new.paths.registry_config,
        registry.readonly_config(new),
        registry.program_file(new),
    }
    config = yaml.safe_load(files[new.paths.registry_config].content)
    assert config["storage"]["s3"]["bucket"] == "images"
    readonly = yaml.safe_load(files[registry.readonly_config(new)].content)
    assert readonly["storage"]["maintenance"]["readonly"] == {"enabled": True}


def test_a_filesystem_target_gets_its_directory_too(tmp_path):
    directory = tmp_path / "srv/images"
    switch = switch_for(tmp_path, {"filesystem": {"rootdirectory": str(directory)}})
    files = {resource.path: resource for resource in switch.registry_files()}
    assert directory in files
    config = yaml.safe_load(files[switch.migration.new_settings.paths.registry_config].content)
    assert config["storage"]["filesystem"] == {"rootdirectory": str(directory)}
