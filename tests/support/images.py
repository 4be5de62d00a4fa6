"""Build container images offline and deterministically, and write them as OCI image layouts.

Everything here is made from bytes the tests choose (plus Debian's static busybox for a runnable
image): no network, no daemon. Determinism comes from fixed tar metadata (mtime, owners, order),
gzip headers with mtime 0 and no file name, fixed zstd parameters and JSON serialised in a fixed
key order. The same inputs on the same machine therefore give the same digests every time; across
machines digests may differ only if zlib/zstd produce different compressed bytes, which is why the
seeding code always compares the registry's digests with the ones computed locally in this run.

Layers are media-type agnostic: the same compressed bytes get the OCI or the Docker media type
depending on the manifest that lists them, so a layer can be shared by OCI and Docker images and
keeps one digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import random
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

# Any fixed instant works; a recent-looking one avoids tools that warn about 1970 timestamps.
FIXED_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MIB = 1024 * 1024

MediaStyle = Literal["oci", "docker"]
Compression = Literal["gzip", "zstd"]

# Fixed compressor settings are part of the determinism contract.
_GZIP_LEVEL = 6
_BIG_GZIP_LEVEL = 1  # big layers are random bytes: spending CPU on compressing them buys nothing
_ZSTD_LEVEL = 3


# --------------------------------------------------------------------------- tar entries


@dataclass(frozen=True)
class File:
    """A regular file in a layer; plain ``bytes`` in a files mapping means ``File(bytes)``."""

    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    target: str


Entry = bytes | File | Dir | Symlink


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tarinfo(name: str, entry: File | Dir | Symlink, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if isinstance(entry, Dir):
        info.type = tarfile.DIRTYPE
        info.mode = entry.mode
    elif isinstance(entry, Symlink):
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
        info.mode = 0o777
    else:
        info.type = tarfile.REGTYPE
        info.mode = entry.mode
        info.size = size
    return info


def _normalise(files: Mapping[str, Entry]) -> list[tuple[str, File | Dir | Symlink]]:
    """Sorted entries with every missing parent directory made explicit.

    Explicit parents matter because some unpackers create missing directories with mode 0700
    or with the current time, which would make rootfs contents differ between runtimes.
    """
    entries: dict[str, File | Dir | Symlink] = {}
    for raw_name, value in files.items():
        name = raw_name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad path in layer: {raw_name!r}")
        entries[name] = File(value) if isinstance(value, bytes) else value
    for name in list(entries):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]), Dir())
    return sorted(entries.items())


def tar_bytes(files: Mapping[str, Entry]) -> bytes:
    """An uncompressed, deterministic tar of ``files`` (paths relative to the rootfs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, entry in _normalise(files):
            if isinstance(entry, File):
                tar.addfile(_tarinfo(name, entry, len(entry.data)), io.BytesIO(entry.data))
            else:
                tar.addfile(_tarinfo(name, entry))
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        # mtime=0 and no file name keep the gzip header free of anything that changes per run.
        return gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


def decompress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.decompress(data)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise ValueError(f"unknown compression {compression!r}")


# --------------------------------------------------------------------------- layers and images


@dataclass(frozen=True)
class Layer:
    """A compressed layer blob. Small layers live in ``data``; big ones in the file ``path``."""

    compression: Compression
    digest: str  # sha256 of the compressed bytes: the distribution digest
    size: int
    diff_id: str  # sha256 of the uncompressed tar, as listed in the config's rootfs.diff_ids
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None

    def media_type(self, style: MediaStyle) -> str:
        if self.compression == "zstd":
            if style == "docker":
                raise ValueError("Docker schema2 has no zstd layer media type; use media_style='oci'")
            return OCI_LAYER_ZSTD
        return DOCKER_LAYER_GZIP if style == "docker" else OCI_LAYER_GZIP

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return self.path.open("rb")

    def read_bytes(self) -> bytes:
        """The whole blob; avoid on big layers (that is what ``open`` is for)."""
        with self.open() as f:
            return f.read()


def build_layer(files: Mapping[str, Entry], *, compression: Compression = "gzip") -> Layer:
    tar = tar_bytes(files)
    blob = compress(tar, compression)
    return Layer(compression, sha256_digest(blob), len(blob), sha256_digest(tar), data=blob)


class _HashingWriter:
    """Write-through file wrapper that hashes and counts what passes, for streaming builds."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        self._sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _PrngReader:
    """File-like source of ``size`` pseudo-random bytes from ``seed``.

    Bytes are generated in fixed 1 MiB chunks, so the stream depends only on the seed, never on
    how the reader is called, and at most one chunk is in memory.
    """

    _CHUNK = MIB

    def __init__(self, seed: int, size: int) -> None:
        self._rng = random.Random(seed)
        self._remaining = size
        self._buf = b""
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            raise ValueError("_PrngReader only supports bounded reads")
        parts = []
        wanted = n
        while wanted and (self._pos < len(self._buf) or self._remaining):
            if self._pos == len(self._buf):
                chunk = min(self._CHUNK, self._remaining)
                self._buf, self._pos = self._rng.randbytes(chunk), 0
                self._remaining -= chunk
            take = min(wanted, len(self._buf) - self._pos)
            parts.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            wanted -= take
        return b"".join(parts)


def build_big_layer(
    path: str | os.PathLike[str],
    size_mib: int,
    *,
    seed: int = 0,
    compression: Compression = "gzip",
    member_name: str = "big.bin",
) -> Layer:
    """Stream a layer holding one ``size_mib`` MiB file of seeded random bytes into ``path``.

    Memory stays at a few MiB whatever the size: the tar is produced in stream mode, compressed
    on the fly and hashed (both compressed and uncompressed) as it goes. Random content barely
    compresses, so the blob is slightly larger than ``size_mib`` MiB, which is what tests of big
    transfers want.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as raw:
        blob_hasher = _HashingWriter(raw)
        compressor: Any
        if compression == "gzip":
            compressor = gzip.GzipFile(
                filename="", mode="wb", fileobj=blob_hasher, compresslevel=_BIG_GZIP_LEVEL, mtime=0
            )
        elif compression == "zstd":
            cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
            compressor = cctx.stream_writer(blob_hasher, closefd=False)
        else:
            raise ValueError(f"unknown compression {compression!r}")
        tar_hasher = _HashingWriter(compressor)
        size = size_mib * MIB
        # "w|" is tarfile's stream mode: it never seeks or tells, so it can write into a compressor.
        with tarfile.open(fileobj=tar_hasher, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(member_name, File(b""), size), _PrngReader(seed, size))
        compressor.close()  # flushes the trailer; neither compressor closes the underlying file
    return Layer(compression, blob_hasher.digest, blob_hasher.size, tar_hasher.digest, path=out)


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def of(cls, value: Platform | Sequence[str]) -> Platform:
        if isinstance(value, Platform):
            return value
        return cls(*value)

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


def host_platform() -> Platform:
    """The platform of binaries on this machine (used for the runnable busybox image)."""
    machine = _platform.machine().lower()
    mapping = {
        "x86_64": Platform("linux", "amd64"),
        "amd64": Platform("linux", "amd64"),
        "aarch64": Platform("linux", "arm64", "v8"),
        "arm64": Platform("linux", "arm64", "v8"),
        "armv7l": Platform("linux", "arm", "v7"),
        "ppc64le": Platform("linux", "ppc64le"),
        "s390x": Platform("linux", "s390x"),
        "riscv64": Platform("linux", "riscv64"),
        "i686": Platform("linux", "386"),
    }
    try:
        return mapping[machine]
    except KeyError:
        raise RuntimeError(f"no OCI platform known for machine {machine!r}") from None


def _json_bytes(obj: Any) -> bytes:
    # Compact, insertion-ordered JSON: what is hashed is exactly what is pushed.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Image:
    """One single-platform image: manifest bytes plus the blobs they reference."""

    manifest: bytes = field(repr=False)
    media_type: str
    digest: str
    config: bytes = field(repr=False)
    config_media_type: str
    config_digest: str
    layers: tuple[Layer, ...]
    platform: Platform
    media_style: MediaStyle

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(layer.digest for layer in self.layers)

    @property
    def layer_media_types(self) -> tuple[str, ...]:
        return tuple(layer.media_type(self.media_style) for layer in self.layers)

    @property
    def blob_digests(self) -> tuple[str, ...]:
        """Config first, then layers: every blob a full pull of this image fetches."""
        return (self.config_digest, *self.layer_digests)

    @property
    def manifest_json(self) -> dict[str, Any]:
        return json.loads(self.manifest)

    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "platform": self.platform.to_json(),
        }


@dataclass(frozen=True)
class Index:
    """A multi-platform image: an OCI image index or a Docker manifest list."""

    manifest: bytes = field(repr=False)
    media_type: str
    digest: str
    images: tuple[Image, ...]
    media_style: MediaStyle

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def child_digests(self) -> tuple[str, ...]:
        return tuple(image.digest for image in self.images)

    @property
    def blob_digests(self) -> tuple[str, ...]:
        """Config and layer digests of every child, deduplicated, in order of first use."""
        return tuple(dict.fromkeys(d for image in self.images for d in image.blob_digests))

    @property
    def manifest_json(self) -> dict[str, Any]:
        return json.loads(self.manifest)

    def for_platform(self, platform: Platform | Sequence[str]) -> Image:
        wanted = Platform.of(platform)
        for image in self.images:
            if image.platform == wanted:
                return image
        raise KeyError(wanted)


def build_image(
    files: Mapping[str, Entry] | None = None,
    *,
    base_layers: Sequence[Layer] = (),
    extra_layers: Sequence[Layer] = (),
    platform: Platform | Sequence[str] = ("linux", "amd64"),
    layer_compression: Compression = "gzip",
    media_style: MediaStyle = "oci",
    container_config: Mapping[str, Any] | None = None,
    created: str = CREATED,
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """Build an image whose layers are ``base_layers``, a layer of ``files``, then ``extra_layers``.

    ``container_config`` becomes the config's ``config`` object (Env, Cmd, Entrypoint, ...);
    it defaults to just a PATH. ``annotations`` are only allowed for OCI manifests.
    """
    plat = Platform.of(platform)
    layers = list(base_layers)
    if files:
        layers.append(build_layer(files, compression=layer_compression))
    layers.extend(extra_layers)
    if not layers:
        raise ValueError("an image needs at least one layer")

    config_obj: dict[str, Any] = {
        "created": created,
        "architecture": plat.architecture,
        "os": plat.os,
    }
    if plat.variant:
        config_obj["variant"] = plat.variant
    config_obj["config"] = dict(container_config) if container_config is not None else {"Env": list(DEFAULT_ENV)}
    config_obj["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    # One history entry per layer: some tools cross-check history against rootfs layers.
    config_obj["history"] = [{"created": created, "created_by": "regcache test image layer"} for _ in layers]
    config = _json_bytes(config_obj)

    if media_style == "oci":
        media_type, config_media_type = OCI_MANIFEST, OCI_CONFIG
    elif media_style == "docker":
        media_type, config_media_type = DOCKER_MANIFEST, DOCKER_CONFIG
        if annotations:
            raise ValueError("Docker schema2 manifests have no annotations")
    else:
        raise ValueError(f"unknown media style {media_style!r}")

    config_digest = sha256_digest(config)
    manifest_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_media_type, "digest": config_digest, "size": len(config)},
        "layers": [
            {"mediaType": layer.media_type(media_style), "digest": layer.digest, "size": layer.size} for layer in layers
        ],
    }
    if annotations:
        manifest_obj["annotations"] = dict(annotations)
    manifest = _json_bytes(manifest_obj)
    return Image(
        manifest=manifest,
        media_type=media_type,
        digest=sha256_digest(manifest),
        config=config,
        config_media_type=config_media_type,
        config_digest=config_digest,
        layers=tuple(layers),
        platform=plat,
        media_style=media_style,
    )


def build_index(images: Sequence[Image], *, media_style: MediaStyle | None = None) -> Index:
    """An OCI index (``oci``) or Docker manifest list (``docker``) over ``images``.

    The style defaults to the children's; mixing styles is refused because a Docker manifest
    list may only reference Docker manifests.
    """
    if not images:
        raise ValueError("an index needs at least one image")
    styles = {image.media_style for image in images}
    style = media_style or (styles.pop() if len(styles) == 1 else None)
    if style is None or (style == "docker" and any(i.media_style != "docker" for i in images)):
        raise ValueError(f"cannot build a {media_style or 'mixed'} index over {sorted(i.media_style for i in images)}")
    media_type = OCI_INDEX if style == "oci" else DOCKER_MANIFEST_LIST
    manifest = _json_bytes(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": [image.descriptor() for image in images]}
    )
    return Index(
        manifest=manifest,
        media_type=media_type,
        digest=sha256_digest(manifest),
        images=tuple(images),
        media_style=style,
    )


# --------------------------------------------------------------------------- busybox

BUSYBOX_APPLETS = (
    "[", "awk", "basename", "cat", "chmod", "cp", "cut", "date", "dirname", "du", "echo", "env",
    "false", "find", "grep", "head", "hostname", "id", "ln", "ls", "md5sum", "mkdir", "mv",
    "printf", "ps", "pwd", "rm", "sed", "sh", "sha256sum", "sleep", "sort", "tail", "tar", "tee",
    "test", "touch", "tr", "true", "uname", "wc", "wget", "which", "xargs",
)


def busybox_rootfs(busybox_path: str | os.PathLike[str] = "/bin/busybox") -> dict[str, Entry]:
    """A minimal rootfs around Debian's static busybox.

    Applets are relative symlinks (``bin/sh -> busybox``) so they also work from an unpacked
    rootfs outside a container, which lets tests check the image without a runtime.
    """
    binary = Path(busybox_path).read_bytes()
    files: dict[str, Entry] = {
        "bin/busybox": File(binary, 0o755),
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        "root": Dir(0o700),
        "tmp": Dir(0o1777),
        # Mount points a runtime expects; creating them here avoids runtimes that refuse to mkdir.
        "proc": Dir(),
        "sys": Dir(),
        "dev": Dir(),
    }
    for applet in BUSYBOX_APPLETS:
        files[f"bin/{applet}"] = Symlink("busybox")
    return files


def build_busybox_image(
    *,
    media_style: MediaStyle = "oci",
    busybox_path: str | os.PathLike[str] = "/bin/busybox",
    platform: Platform | Sequence[str] | None = None,
) -> Image:
    """A runnable image: ``docker run IMG echo hi`` prints ``hi``; with no arguments it runs ``sh``."""
    return build_image(
        busybox_rootfs(busybox_path),
        platform=platform or host_platform(),
        media_style=media_style,
        container_config={"Env": list(DEFAULT_ENV), "Cmd": ["sh"], "WorkingDir": "/"},
    )


# --------------------------------------------------------------------------- OCI layout


def _blobs_of(item: Image | Index) -> Iterator[tuple[str, bytes | Layer]]:
    if isinstance(item, Index):
        yield item.digest, item.manifest
        for image in item.images:
            yield from _blobs_of(image)
        return
    yield item.digest, item.manifest
    yield item.config_digest, item.config
    for layer in item.layers:
        yield layer.digest, layer


def _write_blob(blobs_dir: Path, digest: str, content: bytes | Layer) -> None:
    target = blobs_dir / digest.removeprefix("sha256:")
    if target.exists():
        return  # content-addressed: same name means same bytes
    tmp = target.with_suffix(".tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    elif content.data is not None:
        tmp.write_bytes(content.data)
    else:
        assert content.path is not None
        try:
            # Big layers: a hard link costs nothing; fall back to a copy across filesystems.
            os.link(content.path, tmp)
        except OSError:
            shutil.copyfile(content.path, tmp)
    tmp.replace(target)


def write_oci_layout(
    directory: str | os.PathLike[str],
    items: Mapping[str, Image | Index] | Iterable[tuple[str, Image | Index]],
) -> Path:
    """Write ``items`` (ref name -> image or index) as an OCI image layout in ``directory``.

    Every ref name becomes an ``org.opencontainers.image.ref.name`` annotation in index.json, so
    skopeo can address it as ``oci:DIR:REFNAME``. An existing layout is replaced. Docker-style
    items are written faithfully, but skopeo 1.9 will not find them by ref name (it only looks at
    OCI media types in index.json): push those from ``write_dir_layout`` instead.
    """
    root = Path(directory)
    blobs_dir = root / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    manifests = []
    for ref_name, item in pairs:
        for digest, content in _blobs_of(item):
            _write_blob(blobs_dir, digest, content)
        manifests.append(
            {
                "mediaType": item.media_type,
                "digest": item.digest,
                "size": item.size,
                "annotations": {REF_NAME_ANNOTATION: ref_name},
            }
        )
    (root / "oci-layout").write_bytes(_json_bytes({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_bytes(_json_bytes({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
    return root


def write_dir_layout(directory: str | os.PathLike[str], item: Image | Index) -> Path:
    """Write one image or index in skopeo's ``dir:`` transport format (version 1.1).

    Needed for Docker media types: skopeo 1.9 only resolves ``oci:DIR:REF`` entries whose
    index.json media type is an OCI one, so Docker manifests and manifest lists cannot be pushed
    from an OCI layout. The ``dir:`` format names the top manifest ``manifest.json``, each child
    ``<hex>.manifest.json`` and every other blob by its bare hex digest.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "version").write_text("Directory Transport Version: 1.1\n")
    (root / "manifest.json").write_bytes(item.manifest)
    children = item.images if isinstance(item, Index) else ()
    for image in children:
        (root / f"{image.digest.removeprefix('sha256:')}.manifest.json").write_bytes(image.manifest)
    for image in children or (item,):
        assert isinstance(image, Image)
        _write_blob(root, image.config_digest, image.config)
        for layer in image.layers:
            _write_blob(root, layer.digest, layer)
    return root
