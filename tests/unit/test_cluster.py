"""The cluster's export file and fingerprints (appliance/cluster.py), pure: what is
carried, what is refused (each in one sentence), and when a node is not the cluster's.

The commands on real appliances: tests/appliance/test_cluster_secrets.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from appliance import cluster
from appliance.registry_storage import FilesystemStorage
from appliance.secrets import Secrets, load_or_generate


@pytest.fixture(scope="module")
def node_a(tmp_path_factory) -> Secrets:
    return load_or_generate(tmp_path_factory.mktemp("a") / "secrets.json")


@pytest.fixture(scope="module")
def node_b(tmp_path_factory) -> Secrets:
    return load_or_generate(tmp_path_factory.mktemp("b") / "secrets.json")


def exported(tmp_path: Path, secrets: Secrets) -> Path:
    path = tmp_path / "cluster.json"
    path.write_bytes(cluster.export_document(secrets))
    return path


def test_the_export_carries_every_shared_secret_and_joins_into_another_node(
    tmp_path, node_a, node_b
):
    shared = cluster.read_document(exported(tmp_path, node_a))
    assert shared["token_signing_key"] == node_a.token_signing_key
    assert shared["registry_http_secret"] == node_a.registry_http_secret
    assert shared["letsencrypt_account_key"] == node_a.letsencrypt_account_key
    assert "token_signing_pair_digest" not in shared

    stored = json.loads(node_b.to_json())
    stored["some_future_field"] = "kept"
    path = tmp_path / "b-secrets.json"
    path.write_text(json.dumps(cluster.joined(stored, shared)))
    joined = load_or_generate(path)
    assert cluster.fingerprints(joined) == cluster.fingerprints(node_a)
    assert joined.token_signing_certificate == node_a.token_signing_certificate
    assert json.loads(path.read_text())["some_future_field"] == "kept"


def edit(path: Path, change) -> Path:  # noqa: ANN001 - a function of the document
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    ("damage", "sentence"),
    [
        (lambda p: p.write_text(p.read_text()[:200]), "not an export file (not JSON)"),
        (lambda p: p.write_text("[]"), "not an export file of this appliance"),
        (
            lambda p: edit(p, lambda d: d["secrets"].update(registry_http_secret="x" * 64)),
            "its checksum does not match its content",
        ),
        (lambda p: edit(p, lambda d: d.update(sha256="0" * 64)), "checksum does not match"),
        (lambda p: p.unlink(), "cannot read it"),
    ],
)
def test_a_damaged_or_edited_file_is_refused_in_one_sentence(tmp_path, node_a, damage, sentence):
    path = exported(tmp_path, node_a)
    damage(path)
    with pytest.raises(cluster.ClusterError) as caught:
        cluster.read_document(path)
    message = str(caught.value)
    assert sentence in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert node_a.token_signing_key not in message


def test_a_key_and_certificate_that_disagree_are_refused_even_with_a_fresh_checksum(
    tmp_path, node_a, node_b
):
    path = exported(
        tmp_path, replace(node_a, token_signing_certificate=node_b.token_signing_certificate)
    )
    with pytest.raises(cluster.ClusterError, match="does not belong to its key"):
        cluster.read_document(path)


def test_an_internal_key_in_appliance_yml_must_be_the_clusters(tmp_path, node_a, node_b):
    shared = cluster.read_document(exported(tmp_path, node_a))
    cluster.check_joinable(None, shared)
    cluster.check_joinable(node_a.token_signing_key, shared)
    with pytest.raises(cluster.ClusterError, match="registry.internal_key is set"):
        cluster.check_joinable(node_b.token_signing_key, shared)


def test_the_record_names_fingerprints_not_secrets_and_tells_a_stranger(tmp_path, node_a, node_b):
    storage = FilesystemStorage(tmp_path)
    assert cluster.recorded(storage) is None
    cluster.record(storage, node_a)
    text = (tmp_path / cluster.RECORD_PATH).read_text()
    for value in node_a.private_values():
        assert value not in text
    record = cluster.recorded(storage)
    assert cluster.compare(record, node_a).matches
    verdict = cluster.compare(record, node_b)
    assert not verdict.matches
    assert verdict.sentence.startswith(
        "this node's token-signing key and registry http secret differ from the cluster's"
    )
    assert "appliance-ctl cluster join FILE" in verdict.sentence
    only_secret = cluster.compare(
        record, replace(node_a, registry_http_secret=node_b.registry_http_secret)
    )
    assert "this node's registry http secret differs from" in only_secret.sentence
