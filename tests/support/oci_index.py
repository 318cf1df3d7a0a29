"""OCI layouts with several layers (a base shared by images) and multi-platform indexes,
built on the fly beside tests/support/oci.py's one-layer images.

Layers are deterministic gzip tars (mtime 0): the same files make the same digest, so
two images built on the same `base` share that layer in the registry, as images built
FROM one base do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.support.oci import (
    CONFIG_TYPE,
    LAYER_TYPE,
    MANIFEST_TYPE,
    REF_NAME,
    OciImage,
    _write_blob,
    _write_layer,
)

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


def build_layered(
    layout: Path, tag: str, layers: list[dict[str, bytes]], architecture: str = "amd64"
) -> OciImage:
    """An image of several layers (each a dict of files) under `tag` in `layout`."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    descriptors, diff_ids, size = [], [], 0
    for files in layers:
        digest, layer_size, diff_id = _write_layer(layout, files, 0)
        descriptors.append({"mediaType": LAYER_TYPE, "digest": digest, "size": layer_size})
        diff_ids.append(diff_id)
        size += layer_size
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_digest, config_size = _write_blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": descriptors,
    }
    manifest_digest, manifest_size = _write_blob(layout, json.dumps(manifest).encode())
    _tag(layout, tag, MANIFEST_TYPE, manifest_digest, manifest_size)
    return OciImage(
        layout=layout,
        tag=tag,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=tuple(d["digest"] for d in descriptors),
        size=size + config_size + manifest_size,
    )


@dataclass(frozen=True)
class OciIndex:
    layout: Path
    tag: str
    digest: str
    platforms: dict[str, OciImage]  # "linux/arm64" -> its image

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def build_index(layout: Path, tag: str, platforms: dict[str, list[dict[str, bytes]]]) -> OciIndex:
    """A multi-platform index under `tag`: one image per "os/architecture", each built
    from its layers (what `skopeo copy --all` pushes as an index and its children)."""
    images = {}
    for platform, layers in platforms.items():
        architecture = platform.split("/")[1]
        images[platform] = build_layered(layout, f"{tag}-{architecture}", layers, architecture)
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                "digest": image.manifest_digest,
                "size": len(_blob(layout, image.manifest_digest)),
                "platform": {"os": platform.split("/")[0], "architecture": platform.split("/")[1]},
            }
            for platform, image in images.items()
        ],
    }
    digest, size = _write_blob(layout, json.dumps(index).encode())
    # Only the index is tagged in the layout: the platform images are its children.
    listing = json.loads((layout / "index.json").read_text())
    listing["manifests"] = [
        m
        for m in listing["manifests"]
        if m["digest"] not in {i.manifest_digest for i in images.values()}
    ]
    (layout / "index.json").write_text(json.dumps(listing))
    _tag(layout, tag, INDEX_TYPE, digest, size)
    return OciIndex(layout, tag, digest, images)


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs/sha256" / digest.split(":", 1)[1]).read_bytes()


def _tag(layout: Path, tag: str, media_type: str, digest: str, size: int) -> None:
    path = layout / "index.json"
    listing = (
        json.loads(path.read_text()) if path.exists() else {"schemaVersion": 2, "manifests": []}
    )
    listing["manifests"] = [
        m for m in listing["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    listing["manifests"].append(
        {"mediaType": media_type, "digest": digest, "size": size, "annotations": {REF_NAME: tag}}
    )
    path.write_text(json.dumps(listing))
