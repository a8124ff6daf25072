"""Build, push and inspect test images with plain ``requests``.

This module deliberately does not use the project's own registry client, so tests can
seed source registries and verify destination registries independently of the code
under test. Everything is deterministic: the same arguments produce the same bytes and
therefore the same digests.

``target`` arguments accept a :class:`~tests.support.registry.RegistryProcess`, a
:class:`~tests.support.proxy.CountingProxy` (anything with ``admin()``), a
:class:`~tests.support.registry.RegistrySession`, or a base URL string. ``auth`` may be
``None`` (the target's admin session), a ``(user, password)`` tuple, or a session.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import requests

from .registry import Credentials, RegistrySession

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

#: Accept header that lets the registry return any supported manifest type as-is.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

Media = Literal["docker", "oci"]
#: ``(os, architecture, variant_or_None)``
Platform = tuple[str, str, str | None]
DEFAULT_PLATFORM: Platform = ("linux", "amd64", None)
DEFAULT_PLATFORMS: tuple[Platform, ...] = (("linux", "amd64", None), ("linux", "arm64", "v8"))

_FIXED_MTIME = 1_700_000_000
_FIXED_CREATED = "2024-01-01T00:00:00Z"


class _HasAdmin(Protocol):
    def admin(self) -> RegistrySession: ...

    @property
    def url(self) -> str: ...

    @property
    def ca_file(self) -> Path | None: ...


Target = _HasAdmin | RegistrySession | str
Auth = RegistrySession | Credentials | None


class RegistryError(RuntimeError):
    """A registry answered a test-support request with an unexpected status."""

    def __init__(self, what: str, resp: requests.Response) -> None:
        super().__init__(f"{what}: HTTP {resp.status_code} {resp.text[:500]}")
        self.status_code = resp.status_code
        self.response = resp


# --------------------------------------------------------------------------- helpers


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def session_for(target: Target, auth: Auth = None) -> RegistrySession:
    """Resolve ``target``/``auth`` to a :class:`RegistrySession` (see module docstring)."""
    if isinstance(auth, RegistrySession):
        return auth
    if isinstance(target, RegistrySession):
        if auth is None:
            return target
        return RegistrySession(target.base_url, auth, target.ca_file)
    if isinstance(target, str):
        return RegistrySession(target, auth)
    if auth is None:
        return target.admin()
    return RegistrySession(target.url, auth, target.ca_file)


def platform_string(platform: Platform) -> str:
    """``linux/arm64/v8`` style text for a platform tuple."""
    os_, arch, variant = platform
    return f"{os_}/{arch}/{variant}" if variant else f"{os_}/{arch}"


def _platform_json(platform: Platform) -> dict[str, str]:
    os_, arch, variant = platform
    out = {"architecture": arch, "os": os_}
    if variant:
        out["variant"] = variant
    return out


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=3).encode()


# --------------------------------------------------------------------------- content


def make_layer(
    content: int | Mapping[str, bytes | str] = 1024,
    seed: int | str = 0,
    *,
    compress: bool = True,
) -> bytes:
    """Return a deterministic layer blob: a gzipped (or plain) tar archive.

    Args:
        content: either a size in bytes (one file of pseudo-random, incompressible data
            derived from ``seed``, plus a small text file naming the seed) or a mapping
            ``{path: content}`` of files to include.
        seed: makes layers with the same size differ; same seed → same bytes.
        compress: gzip the tar (``tar+gzip`` media types) or return the raw tar.
    """
    files: dict[str, bytes] = {}
    if isinstance(content, int):
        rng = random.Random(f"layer:{seed}")
        files[f"data/{seed}.bin"] = rng.randbytes(content)
        files[f"etc/seed-{seed}.txt"] = f"seed={seed} size={content}\n".encode()
    else:
        for path, data in content.items():
            files[path.lstrip("/")] = data.encode() if isinstance(data, str) else data

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    info.mtime = _FIXED_MTIME
                    info.uname = info.gname = "root"
                    tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.size = len(files[path])
            info.mode = 0o644
            info.mtime = _FIXED_MTIME
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(files[path]))
    data = raw.getvalue()
    if not compress:
        return data
    return gzip.compress(data, compresslevel=6, mtime=0)


def layer_diff_id(blob: bytes) -> str:
    """The ``rootfs.diff_ids`` entry for a layer: sha256 of the uncompressed tar."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    return sha256_digest(blob)


def make_config(
    os: str = "linux",
    arch: str = "amd64",
    layer_diff_ids: Sequence[str] = (),
    variant: str | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Return an image config JSON (works for Docker and OCI manifests).

    ``layer_diff_ids`` must be the sha256 of each *uncompressed* layer tar (see
    :func:`layer_diff_id`). ``extra`` is merged into the top-level object.
    """
    config: dict[str, Any] = {
        "architecture": arch,
        "os": os,
        "created": _FIXED_CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.example.test": "image-syncer"},
        },
        "rootfs": {"type": "layers", "diff_ids": list(layer_diff_ids)},
        "history": [
            {"created": _FIXED_CREATED, "created_by": f"test layer {i}"}
            for i in range(len(layer_diff_ids))
        ],
    }
    if variant:
        config["variant"] = variant
    if extra:
        config.update(extra)
    return _dumps(config)


def make_image_manifest(config: bytes, layers: Sequence[bytes], media: Media = "docker") -> bytes:
    """Return a schema-2 image manifest (Docker v2 or OCI) referencing the blobs."""
    docker = media == "docker"
    layer_type = DOCKER_LAYER if docker else OCI_LAYER
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "size": len(config),
            "digest": sha256_digest(config),
        },
        "layers": [
            {"mediaType": layer_type, "size": len(layer), "digest": sha256_digest(layer)}
            for layer in layers
        ],
    }
    return _dumps(manifest)


def make_index(
    children: Iterable[tuple[bytes, str, Platform | None]],
    media: Media = "docker",
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """Return a Docker manifest list or OCI index over ``(manifest, media_type, platform)``."""
    entries = []
    for body, media_type, platform in children:
        entry: dict[str, Any] = {
            "mediaType": media_type,
            "size": len(body),
            "digest": sha256_digest(body),
        }
        if platform is not None:
            entry["platform"] = _platform_json(platform)
        entries.append(entry)
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST if media == "docker" else OCI_INDEX,
        "manifests": entries,
    }
    if annotations:
        index["annotations"] = dict(annotations)
    return _dumps(index)


# --------------------------------------------------------------------------- results


@dataclass
class PushedImage:
    """A single-platform image pushed by :func:`push_image`."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    config: bytes
    config_digest: str
    layers: list[bytes]
    layer_digests: list[str]
    platform: Platform

    @property
    def manifest_bytes(self) -> bytes:
        """Alias of ``manifest``."""
        return self.manifest

    @property
    def layer_sizes(self) -> list[int]:
        """Compressed size of each layer blob."""
        return [len(layer) for layer in self.layers]

    @property
    def blob_digests(self) -> list[str]:
        """Config digest followed by the layer digests."""
        return [self.config_digest, *self.layer_digests]

    @property
    def sizes(self) -> dict[str, int]:
        """``{digest: size}`` for the manifest, config and every layer."""
        out = {self.digest: len(self.manifest), self.config_digest: len(self.config)}
        out.update(zip(self.layer_digests, self.layer_sizes, strict=True))
        return out

    @property
    def total_size(self) -> int:
        """Bytes of manifest + config + layers."""
        return sum(self.sizes.values())


@dataclass
class PushedIndex:
    """A multi-platform image pushed by :func:`push_index`."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    children: dict[Platform, PushedImage] = field(default_factory=dict)

    @property
    def manifest_bytes(self) -> bytes:
        """Alias of ``manifest``."""
        return self.manifest

    @property
    def child_digests(self) -> list[str]:
        """Manifest digests of the platform images, in index order."""
        return [child.digest for child in self.children.values()]

    @property
    def blob_digests(self) -> set[str]:
        """Every config and layer digest referenced by any child."""
        return {d for child in self.children.values() for d in child.blob_digests}


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest as served by a registry."""

    body: bytes
    media_type: str
    digest: str

    def json(self) -> Any:
        """The parsed manifest."""
        return json.loads(self.body)


# --------------------------------------------------------------------------- pushing


def _check(resp: requests.Response, what: str, *ok: int) -> requests.Response:
    if resp.status_code not in ok:
        raise RegistryError(what, resp)
    return resp


def _with_digest(location: str, digest: str) -> str:
    parts = urllib.parse.urlsplit(location)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query.append(("digest", digest))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def push_blob(
    target: Target,
    repo: str,
    data: bytes,
    auth: Auth = None,
    *,
    skip_existing: bool = True,
    chunk_size: int | None = None,
) -> str:
    """Upload ``data`` as a blob of ``repo`` and return its digest.

    Uses ``POST /blobs/uploads/`` then ``PUT <location>?digest=`` (monolithic), or
    ``PATCH`` chunks of ``chunk_size`` before the final ``PUT``. With
    ``skip_existing`` a ``HEAD`` first avoids re-uploading a blob the repo already has.
    """
    s = session_for(target, auth)
    digest = sha256_digest(data)
    if skip_existing and blob_exists(s, repo, digest):
        return digest
    resp = _check(s.post(f"/v2/{repo}/blobs/uploads/"), f"start upload to {repo}", 202)
    location = urllib.parse.urljoin(resp.url, resp.headers["Location"])
    body = data
    if chunk_size:
        offset = 0
        while offset < len(data):
            chunk = data[offset : offset + chunk_size]
            resp = _check(
                s.patch(
                    location,
                    data=chunk,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                    },
                ),
                f"upload chunk to {repo}",
                202,
            )
            location = urllib.parse.urljoin(resp.url, resp.headers["Location"])
            offset += len(chunk)
        body = b""
    resp = s.put(
        _with_digest(location, digest),
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    _check(resp, f"finish upload of {digest} to {repo}", 201)
    return digest


def mount_blob(target: Target, repo: str, digest: str, from_repo: str, auth: Auth = None) -> bool:
    """Try a cross-repository mount; True if the registry mounted it (201)."""
    s = session_for(target, auth)
    resp = s.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": from_repo})
    if resp.status_code == 202:  # not mounted: cancel the upload session it opened
        location = urllib.parse.urljoin(resp.url, resp.headers["Location"])
        s.delete(location)
    return resp.status_code == 201


def push_manifest(
    target: Target,
    repo: str,
    ref: str,
    body: bytes,
    media_type: str,
    auth: Auth = None,
) -> str:
    """``PUT /v2/<repo>/manifests/<ref>``; return the digest (checked against ``body``)."""
    s = session_for(target, auth)
    resp = _check(
        s.put(f"/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media_type}),
        f"push manifest {repo}:{ref}",
        201,
    )
    digest = sha256_digest(body)
    served = resp.headers.get("Docker-Content-Digest")
    if served and served != digest:
        raise AssertionError(f"registry digest {served} != local {digest}")
    return digest


def push_image(
    target: Target,
    repo: str,
    tag: str | None,
    *,
    media: Media = "docker",
    layers: Sequence[bytes] | None = None,
    platform: Platform = DEFAULT_PLATFORM,
    seed: str | int | None = None,
    config_extra: Mapping[str, Any] | None = None,
    auth: Auth = None,
) -> PushedImage:
    """Push a single-platform image (config + layers + manifest) and tag it.

    Args:
        tag: tag to push the manifest under; ``None`` pushes by digest only.
        media: ``"docker"`` (schema 2) or ``"oci"`` manifest and blob media types.
        layers: layer blobs (e.g. from :func:`make_layer`); pass the same bytes to share
            layers between images/repositories. Default: one 1 KiB layer derived from
            ``seed`` (default: tag + platform), so distinct tags get distinct layers.
        platform: ``(os, arch, variant)`` written into the config.
    """
    s = session_for(target, auth)
    if layers is None:
        base = seed if seed is not None else (tag or "untagged")
        layers = [make_layer(1024, seed=f"{base}|{platform_string(platform)}")]
    layers = list(layers)
    os_, arch, variant = platform
    config = make_config(
        os_, arch, [layer_diff_id(layer) for layer in layers], variant, extra=config_extra
    )
    layer_digests = [push_blob(s, repo, layer) for layer in layers]
    config_digest = push_blob(s, repo, config)
    manifest = make_image_manifest(config, layers, media)
    media_type = DOCKER_MANIFEST if media == "docker" else OCI_MANIFEST
    digest = push_manifest(s, repo, tag or sha256_digest(manifest), manifest, media_type)
    return PushedImage(
        repo=repo,
        tag=tag,
        digest=digest,
        manifest=manifest,
        media_type=media_type,
        config=config,
        config_digest=config_digest,
        layers=layers,
        layer_digests=layer_digests,
        platform=platform,
    )


def push_index(
    target: Target,
    repo: str,
    tag: str | None,
    platforms: Sequence[Platform] = DEFAULT_PLATFORMS,
    *,
    media: Media = "docker",
    shared_layers: Sequence[bytes] = (),
    seed: str | int | None = None,
    annotations: Mapping[str, str] | None = None,
    auth: Auth = None,
) -> PushedIndex:
    """Push one image per platform (by digest), then a manifest list / OCI index.

    Every child gets ``shared_layers`` followed by one platform-specific layer.
    ``media="docker"`` makes a Docker manifest list of Docker manifests, ``"oci"`` an
    OCI index of OCI manifests.
    """
    s = session_for(target, auth)
    base = seed if seed is not None else (tag or "untagged")
    children: dict[Platform, PushedImage] = {}
    for platform in platforms:
        own = make_layer(1024, seed=f"{base}|{platform_string(platform)}")
        children[platform] = push_image(
            s, repo, None, media=media, layers=[*shared_layers, own], platform=platform
        )
    index = make_index(
        ((c.manifest, c.media_type, p) for p, c in children.items()), media, annotations
    )
    media_type = DOCKER_LIST if media == "docker" else OCI_INDEX
    digest = push_manifest(s, repo, tag or sha256_digest(index), index, media_type)
    return PushedIndex(
        repo=repo,
        tag=tag,
        digest=digest,
        manifest=index,
        media_type=media_type,
        children=children,
    )


# --------------------------------------------------------------------------- reading


def manifest_digest(target: Target, repo: str, ref: str, auth: Auth = None) -> str | None:
    """``HEAD`` a manifest with a full Accept header; its ``Docker-Content-Digest``.

    Returns None if the registry answers 404; raises :class:`RegistryError` otherwise.
    """
    s = session_for(target, auth)
    resp = s.head(f"/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT})
    if resp.status_code == 404:
        return None
    _check(resp, f"HEAD manifest {repo}:{ref}", 200)
    return resp.headers.get("Docker-Content-Digest")


def get_manifest(target: Target, repo: str, ref: str, auth: Auth = None) -> FetchedManifest | None:
    """``GET`` a manifest as-is (any type); None on 404. The digest is computed locally."""
    s = session_for(target, auth)
    resp = s.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT})
    if resp.status_code == 404:
        return None
    _check(resp, f"GET manifest {repo}:{ref}", 200)
    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
    return FetchedManifest(resp.content, media_type, sha256_digest(resp.content))


def blob_exists(target: Target, repo: str, digest: str, auth: Auth = None) -> bool:
    """True if ``HEAD /v2/<repo>/blobs/<digest>`` answers 200."""
    s = session_for(target, auth)
    resp = s.head(f"/v2/{repo}/blobs/{digest}", allow_redirects=True)
    if resp.status_code == 404:
        return False
    _check(resp, f"HEAD blob {repo}@{digest}", 200)
    return True


def get_blob(target: Target, repo: str, digest: str, auth: Auth = None) -> bytes:
    """Download a blob and check its digest."""
    s = session_for(target, auth)
    resp = _check(s.get(f"/v2/{repo}/blobs/{digest}"), f"GET blob {repo}@{digest}", 200)
    if sha256_digest(resp.content) != digest:
        raise AssertionError(f"blob {digest} served with wrong content")
    return resp.content


def list_tags(target: Target, repo: str, auth: Auth = None) -> list[str]:
    """All tags of ``repo`` (following ``Link`` pagination); [] if the repo is unknown."""
    s = session_for(target, auth)
    tags: list[str] = []
    url: str | None = f"/v2/{repo}/tags/list"
    while url:
        resp = s.get(url)
        if resp.status_code == 404:
            return tags
        _check(resp, f"list tags of {repo}", 200)
        tags.extend(resp.json().get("tags") or [])
        nxt = resp.links.get("next", {}).get("url")
        url = urllib.parse.urljoin(resp.url, nxt) if nxt else None
    return tags


def catalog(target: Target, auth: Auth = None) -> list[str]:
    """All repositories from ``/v2/_catalog`` (following pagination)."""
    s = session_for(target, auth)
    repos: list[str] = []
    url: str | None = "/v2/_catalog"
    while url:
        resp = _check(s.get(url), "catalog", 200)
        repos.extend(resp.json().get("repositories") or [])
        nxt = resp.links.get("next", {}).get("url")
        url = urllib.parse.urljoin(resp.url, nxt) if nxt else None
    return repos


def delete_manifest(target: Target, repo: str, digest: str, auth: Auth = None) -> None:
    """Delete a manifest by digest (the registry runs with ``storage.delete.enabled``)."""
    s = session_for(target, auth)
    _check(s.delete(f"/v2/{repo}/manifests/{digest}"), f"delete {repo}@{digest}", 202)


@dataclass
class ImageContents:
    """Every digest reachable from a reference, as found by :func:`walk_image`."""

    digest: str
    media_type: str
    manifests: dict[str, FetchedManifest] = field(default_factory=dict)
    blobs: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)


def walk_image(
    target: Target, repo: str, ref: str, auth: Auth = None, *, check_blobs: bool = True
) -> ImageContents:
    """Fetch ``ref`` and everything it references (children, config, layers).

    Missing manifests or (with ``check_blobs``) missing blobs are collected in
    ``missing`` rather than raised, so a test can ``assert not contents.missing``.
    """
    s = session_for(target, auth)
    top = get_manifest(s, repo, ref)
    if top is None:
        raise LookupError(f"{repo}:{ref} not found")
    contents = ImageContents(digest=top.digest, media_type=top.media_type)
    pending = [top]
    while pending:
        fetched = pending.pop()
        contents.manifests[fetched.digest] = fetched
        doc = fetched.json()
        for child in doc.get("manifests") or []:
            sub = get_manifest(s, repo, child["digest"])
            if sub is None:
                contents.missing.add(child["digest"])
            else:
                pending.append(sub)
        descriptors = ([doc["config"]] if "config" in doc else []) + (doc.get("layers") or [])
        for desc in descriptors:
            contents.blobs.add(desc["digest"])
            if check_blobs and not blob_exists(s, repo, desc["digest"]):
                contents.missing.add(desc["digest"])
    return contents


# --------------------------------------------------------------------------- artifacts, referrers

OCI_EMPTY = "application/vnd.oci.empty.v1+json"
#: The OCI 1.1 "empty" config blob (``{}``) that artifacts without a config point at.
EMPTY_CONFIG = b"{}"
IN_TOTO = "application/vnd.in-toto+json"
SPDX_JSON = "application/spdx+json"
NOTATION_SIGNATURE = "application/vnd.cncf.notary.signature"
COSIGN_SIGNATURE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"
UNKNOWN_PLATFORM: Platform = ("unknown", "unknown", None)


@dataclass
class PushedArtifact:
    """A manifest about something else (an OCI artifact, a buildx attestation, a cosign
    signature) pushed by :func:`push_artifact`, :func:`push_attestation` or
    :func:`push_cosign`."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    artifact_type: str
    blobs: list[bytes]
    subject: str | None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def manifest_bytes(self) -> bytes:
        """Alias of ``manifest``."""
        return self.manifest

    def descriptor(self) -> dict[str, Any]:
        """The descriptor a referrers list holds for it (artifactType and annotations
        included, as the OCI 1.1 spec asks)."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest),
            "artifactType": self.artifact_type,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def descriptor_of(pushed: Any) -> dict[str, Any]:
    """``{"mediaType", "digest", "size"}`` of anything pushed or fetched (e.g. as a
    ``subject``)."""
    body = pushed.body if isinstance(pushed, FetchedManifest) else pushed.manifest
    return {"mediaType": pushed.media_type, "digest": pushed.digest, "size": len(body)}


def referrers_tag(digest: str) -> str:
    """The OCI referrers tag schema's tag for ``digest``: ``sha256-<hex>``."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}-{hexdigest}"


def make_artifact_manifest(
    payloads: Sequence[tuple[bytes, str]],
    *,
    artifact_type: str | None,
    subject: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
    config: bytes = EMPTY_CONFIG,
    config_media_type: str = OCI_EMPTY,
    layer_annotations: Mapping[str, str] | None = None,
) -> bytes:
    """An OCI 1.1 image manifest used as an artifact: ``artifactType``, a config (by default
    the empty descriptor, with its ``data``), ``layers`` of any media types, ``subject``."""
    config_desc: dict[str, Any] = {
        "mediaType": config_media_type, "digest": sha256_digest(config), "size": len(config),
    }
    if config == EMPTY_CONFIG and config_media_type == OCI_EMPTY:
        config_desc["data"] = "e30="
    layers = []
    for data, media_type in payloads:
        layer: dict[str, Any] = {
            "mediaType": media_type, "digest": sha256_digest(data), "size": len(data),
        }
        if layer_annotations:
            layer["annotations"] = dict(layer_annotations)
        layers.append(layer)
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["config"] = config_desc
    doc["layers"] = layers
    if subject is not None:
        doc["subject"] = dict(subject)
    if annotations:
        doc["annotations"] = dict(annotations)
    return _dumps(doc)


def push_artifact(
    target: Target,
    repo: str,
    *,
    artifact_type: str | None,
    payloads: Sequence[tuple[bytes, str]],
    subject: PushedImage | PushedIndex | PushedArtifact | None = None,
    tag: str | None = None,
    annotations: Mapping[str, str] | None = None,
    config: bytes = EMPTY_CONFIG,
    config_media_type: str = OCI_EMPTY,
    layer_annotations: Mapping[str, str] | None = None,
    auth: Auth = None,
) -> PushedArtifact:
    """Push an artifact (its blobs, then its manifest by digest, or under ``tag``).

    Like ``oras attach`` against a registry with the referrers API; against one without it,
    follow with :func:`add_to_referrers_tag` (what ORAS does there).
    """
    s = session_for(target, auth)
    blobs = [config, *(data for data, _ in payloads)]
    for blob in blobs:
        push_blob(s, repo, blob)
    body = make_artifact_manifest(
        payloads, artifact_type=artifact_type,
        subject=descriptor_of(subject) if subject is not None else None,
        annotations=annotations, config=config, config_media_type=config_media_type,
        layer_annotations=layer_annotations,
    )
    digest = push_manifest(s, repo, tag or sha256_digest(body), body, OCI_MANIFEST)
    return PushedArtifact(
        repo=repo, tag=tag, digest=digest, manifest=body, media_type=OCI_MANIFEST,
        artifact_type=artifact_type or config_media_type, blobs=blobs,
        subject=subject.digest if subject is not None else None,
        annotations=dict(annotations or {}),
    )


def referrers_in_tag(target: Target, repo: str, subject_digest: str, auth: Auth = None
                     ) -> list[dict] | None:
    """The descriptors in ``repo``'s referrers tag for ``subject_digest``; None without one."""
    found = get_manifest(target, repo, referrers_tag(subject_digest), auth)
    return None if found is None else list(found.json().get("manifests") or [])


def add_to_referrers_tag(
    target: Target, repo: str, subject_digest: str, artifacts: Sequence[PushedArtifact],
    auth: Auth = None,
) -> str:
    """Append ``artifacts`` to the referrers tag of ``subject_digest`` (creating it), as a
    client does on a registry without the referrers API; the index's digest."""
    s = session_for(target, auth)
    entries = referrers_in_tag(s, repo, subject_digest) or []
    have = {e["digest"] for e in entries}
    entries += [a.descriptor() for a in artifacts if a.digest not in have]
    body = _dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    return push_manifest(s, repo, referrers_tag(subject_digest), body, OCI_INDEX)


def push_cosign(
    target: Target, repo: str, subject_digest: str, kind: Literal["sig", "att", "sbom"] = "sig",
    *, seed: str = "cosign", auth: Auth = None,
) -> PushedArtifact:
    """A cosign-style signature (``.sig``), attestation (``.att``) or SBOM (``.sbom``) tag:
    an image manifest with a plain image config and one layer, no ``subject``, tagged
    ``sha256-<hex>.<kind>``."""
    s = session_for(target, auth)
    layer_type = {"sig": COSIGN_SIGNATURE, "att": DSSE_ENVELOPE, "sbom": SPDX_JSON}[kind]
    payload = json.dumps({"critical": {"image": {"docker-manifest-digest": subject_digest},
                                       "type": f"cosign container image {kind}"},
                          "optional": {"seed": seed}}).encode()
    config = _dumps({"architecture": "", "os": "", "config": {},
                     "rootfs": {"type": "layers", "diff_ids": [sha256_digest(payload)]}})
    annotations = {"dev.cosignproject.cosign/signature": f"MEUCIQ-{seed}"} if kind == "sig" else {}
    return push_artifact(
        s, repo, artifact_type=None, payloads=[(payload, layer_type)],
        tag=f"{referrers_tag(subject_digest)}.{kind}", config=config,
        config_media_type=OCI_CONFIG, layer_annotations=annotations,
    )


@dataclass
class PushedBuildx:
    """A buildx-style multi-platform image: an OCI index with, per platform, the image and
    its attestation manifest (platform unknown/unknown)."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    children: dict[Platform, PushedImage]
    attestations: dict[Platform, PushedArtifact]

    @property
    def child_digests(self) -> list[str]:
        """Image manifests, then attestation manifests."""
        return [c.digest for c in self.children.values()] + [
            a.digest for a in self.attestations.values()]


def push_attestation(target: Target, repo: str, image: PushedImage, *, seed: str = "",
                     auth: Auth = None) -> PushedArtifact:
    """A buildx attestation manifest for ``image``: an OCI manifest whose config is an image
    config for unknown/unknown and whose layers are in-toto statements (provenance, SBOM)."""
    statements = [
        (json.dumps({"_type": "https://in-toto.io/Statement/v0.1",
                     "predicateType": predicate, "subject": [{"digest": {
                         "sha256": image.digest.split(":", 1)[1]}}],
                     "predicate": {"seed": seed}}).encode(), IN_TOTO)
        for predicate in ("https://slsa.dev/provenance/v0.2", "https://spdx.dev/Document")
    ]
    config = _dumps({"architecture": "unknown", "os": "unknown", "config": {},
                     "rootfs": {"type": "layers",
                                "diff_ids": [sha256_digest(d) for d, _ in statements]}})
    return push_artifact(target, repo, artifact_type=None, payloads=statements, config=config,
                         config_media_type=OCI_CONFIG, auth=auth)


def push_buildx_index(
    target: Target, repo: str, tag: str | None,
    platforms: Sequence[Platform] = DEFAULT_PLATFORMS, *, seed: str | None = None,
    auth: Auth = None,
) -> PushedBuildx:
    """Push what ``docker buildx build --platform ... --provenance --sbom --push`` pushes:
    OCI images, one attestation manifest each, and the index naming them all (attestations
    with platform unknown/unknown and the ``vnd.docker.reference.*`` annotations)."""
    s = session_for(target, auth)
    base = seed if seed is not None else (tag or "untagged")
    children: dict[Platform, PushedImage] = {}
    attestations: dict[Platform, PushedArtifact] = {}
    entries: list[dict[str, Any]] = []
    for platform in platforms:
        own = make_layer(1024, seed=f"{base}|{platform_string(platform)}")
        image = push_image(s, repo, None, media="oci", layers=[own], platform=platform)
        children[platform] = image
        entries.append({**descriptor_of(image), "platform": _platform_json(platform)})
    for platform, image in children.items():
        attestation = push_attestation(s, repo, image, seed=f"{base}|{platform_string(platform)}")
        attestations[platform] = attestation
        entries.append({
            **descriptor_of(attestation),
            "annotations": {"vnd.docker.reference.digest": image.digest,
                            "vnd.docker.reference.type": "attestation-manifest"},
            "platform": _platform_json(UNKNOWN_PLATFORM),
        })
    body = _dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    digest = push_manifest(s, repo, tag or sha256_digest(body), body, OCI_INDEX)
    return PushedBuildx(repo, tag, digest, body, OCI_INDEX, children, attestations)


def push_nested_index(
    target: Target, repo: str, tag: str | None,
    children: Sequence[tuple[PushedImage | PushedIndex | PushedBuildx, Platform | None]],
    auth: Auth = None,
) -> PushedIndex:
    """An OCI index over already pushed images *and indexes* (a nested index), each entry
    with the platform given (None: no platform, as for a nested index)."""
    entries = []
    for child, platform in children:
        entry = descriptor_of(child)
        if platform is not None:
            entry["platform"] = _platform_json(platform)
        entries.append(entry)
    body = _dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    digest = push_manifest(target, repo, tag or sha256_digest(body), body, OCI_INDEX, auth)
    return PushedIndex(repo=repo, tag=tag, digest=digest, manifest=body, media_type=OCI_INDEX)
