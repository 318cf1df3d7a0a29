"""OCI image layouts built on the fly, so push/pull tests need no network and no daemon.

A layout is what `skopeo copy oci:DIR:TAG ...` reads: `oci-layout`, `index.json` naming
the manifest by tag, and content-addressed blobs (one gzip tar layer, the image config,
the manifest). Digests are computed while writing, so they are the ones a registry
must report back.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
RANDOM_CHUNK = 1 << 20


@dataclass(frozen=True)
class OciImage:
    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]
    size: int  # bytes of all blobs, what a push transfers

    @property
    def reference(self) -> str:
        """The skopeo transport reference of this image."""
        return f"oci:{self.layout}:{self.tag}"


class _DigestingWriter(io.RawIOBase):
    """A file that hashes and counts what goes through it, so big layers stream once."""

    def __init__(self, target: io.BufferedWriter) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.target.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


def _blob_dir(layout: Path) -> Path:
    path = layout / "blobs" / "sha256"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (_blob_dir(layout) / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _write_layer(layout: Path, files: dict[str, bytes], random_bytes: int) -> tuple[str, int, str]:
    """Write one gzip tar layer; return its digest, size and uncompressed diff ID."""
    partial = _blob_dir(layout) / "layer.partial"
    with open(partial, "wb") as raw:
        compressed = _DigestingWriter(raw)
        # Random data does not compress: level 0 (stored blocks) keeps a 256 MB layer
        # cheap to build while still being the gzip media type registries expect.
        level = 0 if random_bytes else 6
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=level, mtime=0) as gz:
            uncompressed = _DigestingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name, content in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(content)
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(content))
                if random_bytes:
                    info = tarfile.TarInfo("random.bin")
                    info.size = random_bytes
                    tar.addfile(info, _RandomStream(random_bytes))
    digest = compressed.sha256.hexdigest()
    os.replace(partial, _blob_dir(layout) / digest)
    return f"sha256:{digest}", compressed.size, f"sha256:{uncompressed.sha256.hexdigest()}"


class _RandomStream(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        size = self.left if size < 0 else min(size, self.left, RANDOM_CHUNK)
        self.left -= size
        return os.urandom(size)


def build_image(
    layout: Path,
    tag: str = "latest",
    files: dict[str, bytes] | None = None,
    random_bytes: int = 0,
    base: dict[str, bytes] | None = None,
    created: str | None = None,
    platform: tuple[str, str] = ("linux", "amd64"),
) -> OciImage:
    """Build a one-layer image at `layout` (created or extended) under `tag`; with
    `base`, a first layer of those files under it (the same bytes give the same layer,
    so images built on one base share it, as images on one base image do).

    Two images built with different `files` or any `random_bytes` have different
    digests, so a test pushing both sees two distinct manifests. `created` (RFC 3339)
    goes into the config as a build tool writes it; `platform` is (os, architecture).
    """
    if files is None and not random_bytes:
        files = {"hello.txt": os.urandom(16).hex().encode()}
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layers = [_write_layer(layout, base, 0)] if base is not None else []
    layers.append(_write_layer(layout, files or {}, random_bytes))
    config = {
        "architecture": platform[1],
        "os": platform[0],
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, _, diff_id in layers]},
    }
    if created is not None:
        config["created"] = created
    config_digest, config_size = _write_blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": LAYER_TYPE, "digest": digest, "size": size} for digest, size, _ in layers
        ],
    }
    manifest_digest, manifest_size = _write_blob(layout, json.dumps(manifest).encode())
    _add_to_index(layout, tag, manifest_digest, manifest_size)
    return OciImage(
        layout=layout,
        tag=tag,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=tuple(digest for digest, _, _ in layers),
        size=sum(size for _, size, _ in layers) + config_size + manifest_size,
    )


@dataclass(frozen=True)
class OciIndex:
    layout: Path
    tag: str
    index_digest: str
    children: dict[str, OciImage]  # "linux/amd64" -> that platform's image
    size: int  # bytes of the index, its children's manifests and their blobs

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def build_index(
    layout: Path,
    tag: str = "multi",
    platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64"),
    created: tuple[str | None, ...] | None = None,
) -> OciIndex:
    """A multi-platform image: an OCI index under `tag` naming one single-layer image per
    platform (each with its own layer, so their digests differ). Push it with
    `skopeo copy --all` (`Skopeo.push_all`); `created[i]` is the i-th child's date."""
    children: dict[str, OciImage] = {}
    descriptors = []
    for number, platform in enumerate(platforms):
        os_name, architecture = platform.split("/", 1)
        child = build_image(
            layout,
            tag=f"{tag}-{os_name}-{architecture}".replace("/", "-"),
            files={"platform.txt": f"{platform} {os.urandom(8).hex()}".encode()},
            created=created[number] if created else None,
            platform=(os_name, architecture),
        )
        children[platform] = child
        descriptors.append(
            {
                "mediaType": MANIFEST_TYPE,
                "digest": child.manifest_digest,
                "size": (_blob_dir(layout) / child.manifest_digest[7:]).stat().st_size,
                "platform": {"os": os_name, "architecture": architecture},
            }
        )
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": descriptors}
    index_digest, index_size = _write_blob(layout, json.dumps(index).encode())
    _add_to_index(layout, tag, index_digest, index_size, INDEX_TYPE)
    return OciIndex(
        layout=layout,
        tag=tag,
        index_digest=index_digest,
        children=children,
        size=index_size + sum(child.size for child in children.values()),
    )


def _add_to_index(
    layout: Path, tag: str, digest: str, size: int, media_type: str = MANIFEST_TYPE
) -> None:
    index_path = layout / "index.json"
    index = {"schemaVersion": 2, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    index["manifests"].append(
        {
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {REF_NAME: tag},
        }
    )
    index_path.write_text(json.dumps(index))


def read_image(layout: Path, tag: str) -> OciImage:
    """The image a layout holds under `tag`, e.g. one skopeo pulled, to compare digests."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            break
    else:
        raise KeyError(f"{layout} has no tag {tag!r}")
    digest = entry["digest"]
    manifest_blob = _blob_dir(layout) / digest.split(":", 1)[1]
    manifest = json.loads(manifest_blob.read_bytes())
    blobs = [manifest["config"], *manifest["layers"]]
    for blob in blobs:
        with open(_blob_dir(layout) / blob["digest"].split(":", 1)[1], "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if f"sha256:{actual}" != blob["digest"]:
            raise ValueError(f"{layout}: blob {blob['digest']} does not match its digest")
    return OciImage(
        layout=layout,
        tag=tag,
        manifest_digest=digest,
        config_digest=manifest["config"]["digest"],
        layer_digests=tuple(layer["digest"] for layer in manifest["layers"]),
        size=sum(blob["size"] for blob in blobs) + manifest_blob.stat().st_size,
    )
