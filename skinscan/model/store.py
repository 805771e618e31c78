"""Model bundles in object storage: uploaded once at registration, fetched into each machine's cache on first use.

A bundle is stored under `models/<version>/<checksum>/`: every file of its folder (weights, ONNX export,
metadata, splits, model card, evaluation plots) and `bundle-manifest.json`, which names each file with its
SHA-256. The checksum is the SHA-256 of that manifest and is recorded in the registry, so a machine that fetches
the bundle checks the manifest against the database and every file against the manifest: a damaged object or a
damaged cached file is an error or a fresh fetch, never a silently different model. A fetch downloads into a
temporary folder of the cache, verifies it, then renames it into place, so a crash never leaves half a bundle.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from skinscan.settings import Settings
from skinscan.storage import Storage, get_storage

log = logging.getLogger(__name__)

MODELS_PREFIX = "models/"
MANIFEST_FILE = "bundle-manifest.json"
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_SKIPPED = {MANIFEST_FILE, "__pycache__", ".DS_Store"}

_VERIFIED: set[Path] = set()  # cache folders this process has verified (each is checked once per process)
_LOCK = threading.Lock()


class BundleStoreError(RuntimeError):
    """A bundle that cannot be stored or fetched intact (bad file name, checksum mismatch, wrong version)."""


@dataclass(frozen=True)
class StoredBundle:
    """Where a bundle lies in object storage and the checksum of its manifest (what the registry records)."""

    version: str
    prefix: str
    checksum: str
    files: dict[str, str]


@dataclass(frozen=True)
class BundleRef:
    """What a machine needs to find a registered version's bundle: its storage prefix and checksum, or, for a
    version registered before bundles were stored, only the folder it was registered from."""

    version: str
    prefix: str | None
    checksum: str | None
    path: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _slug(version: str) -> str:
    """The version as a storage key and folder name segment (anything but [A-Za-z0-9._-] becomes '_')."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", version).strip(".") or "_"
    return slug[:120]


def manifest_bytes(version: str, files: dict[str, str]) -> bytes:
    """Return the canonical manifest of a bundle: its version and {file name: SHA-256}, sorted, compact JSON."""
    return json.dumps({"version": version, "files": dict(sorted(files.items()))}, sort_keys=True,
                      separators=(",", ":")).encode()


def bundle_checksum(version: str, files: dict[str, str]) -> str:
    """Return the bundle's checksum: the SHA-256 of its canonical manifest."""
    return _sha256(manifest_bytes(version, files))


def storage_prefix(version: str, checksum: str) -> str:
    """Return the key prefix a bundle is stored under: models/<version>/<checksum>/."""
    return f"{MODELS_PREFIX}{_slug(version)}/{checksum}/"


def bundle_files(folder: Path) -> dict[str, str]:
    """Return {relative name: SHA-256} of every file in a bundle folder (hidden files and caches left out)."""
    from skinscan.model.bundle import sha256_file  # one file hash for training and serving (no torch import)

    if not folder.is_dir():
        raise BundleStoreError(f"{folder} is not a bundle folder")
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part in _SKIPPED or part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        name = rel.as_posix()
        if not _FILE_NAME.match(name) or len(name) > 200:
            raise BundleStoreError(f"bundle file name {name!r} is not allowed (letters, digits, '._-' only)")
        files[name] = sha256_file(path)
    if "metadata.json" not in files:
        raise BundleStoreError(f"{folder} is not a model bundle: metadata.json is missing")
    return files


def upload_bundle(storage: Storage, folder: Path, version: str) -> StoredBundle:
    """Upload every file of a bundle folder, then its manifest, under its version+checksum prefix (idempotent)."""
    files = bundle_files(folder)
    checksum = bundle_checksum(version, files)
    prefix = storage_prefix(version, checksum)
    for name, digest in files.items():
        data = (folder / name).read_bytes()
        if _sha256(data) != digest:
            raise BundleStoreError(f"bundle file {folder / name} changed while it was uploaded; register it again")
        storage.put(prefix + name, data, mimetypes.guess_type(name)[0] or "application/octet-stream")
    # Written last: a manifest in storage means every file named in it was stored before.
    storage.put(prefix + MANIFEST_FILE, manifest_bytes(version, files), "application/json")
    log.info("bundle %s stored under %s (%d files)", version, prefix, len(files))
    return StoredBundle(version, prefix, checksum, files)


def _read_manifest(data: bytes, ref: BundleRef, where: str) -> dict[str, str]:
    """Parse a manifest, checking it against the registered checksum and version."""
    if _sha256(data) != ref.checksum:
        raise BundleStoreError(f"the manifest of model {ref.version} ({where}) does not match its registered "
                               f"checksum {ref.checksum}")
    manifest = json.loads(data)
    if manifest.get("version") != ref.version:
        raise BundleStoreError(f"the manifest at {where} is of model {manifest.get('version')!r}, not {ref.version}")
    files = dict(manifest["files"])
    if not all(isinstance(n, str) and _FILE_NAME.match(n) for n in files):
        raise BundleStoreError(f"the manifest of model {ref.version} names a file that is not allowed")
    return files


def verify_folder(folder: Path, ref: BundleRef) -> str | None:
    """Return None when a cached folder holds the registered bundle intact, else what is wrong with it."""
    from skinscan.model.bundle import sha256_file  # one file hash for training and serving (no torch import)

    try:
        files = _read_manifest((folder / MANIFEST_FILE).read_bytes(), ref, str(folder))
    except (OSError, ValueError, KeyError, BundleStoreError) as exc:
        return f"manifest: {exc}"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its checksum"
    return None


def cache_folder(ref: BundleRef, settings: Settings) -> Path:
    """Return the folder a version's bundle is cached in on this machine."""
    return settings.model_cache / _slug(ref.version) / str(ref.checksum)


@contextmanager
def _machine_lock(cache: Path, checksum: str) -> Iterator[None]:
    """Serialise fetches of one bundle among this machine's processes (an flock on a file in the cache)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".lock-{checksum}").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch(ref: BundleRef, storage: Storage, final: Path, cache: Path) -> None:
    """Download a bundle into a temporary folder of the cache, verify every file, then rename it to final."""
    from skinscan.model.bundle import BundleError, load_bundle

    assert ref.prefix is not None
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".fetch-"))
    try:
        manifest = storage.get(ref.prefix + MANIFEST_FILE)
        files = _read_manifest(manifest, ref, f"storage key {ref.prefix}{MANIFEST_FILE}")
        for name, digest in files.items():
            data = storage.get(ref.prefix + name)
            if _sha256(data) != digest:
                raise BundleStoreError(f"stored object {ref.prefix}{name} of model {ref.version} does not match its "
                                       "checksum: the stored bundle is damaged; register the bundle again")
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (tmp / MANIFEST_FILE).write_bytes(manifest)
        try:
            bundle = load_bundle(tmp, verify=True)
        except BundleError as exc:
            raise BundleStoreError(f"the stored bundle of model {ref.version} is not usable: {exc}") from None
        if bundle.version != ref.version:
            raise BundleStoreError(f"the stored bundle at {ref.prefix} is model {bundle.version}, not {ref.version}")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Move a damaged cached folder aside (one rename), then delete it."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def local_bundle(ref: BundleRef, settings: Settings, storage: Storage | None = None) -> Path:
    """Return a local folder holding a registered version's bundle, verified against its checksum.

    The first use on a machine fetches it from object storage into the cache; a cached copy is verified once per
    process, and one that no longer matches is fetched again. A version registered before bundles were stored
    (no prefix) is its registered folder, as before. Raises BundleStoreError when the stored bundle is damaged,
    StorageError when storage cannot be reached.
    """
    if ref.prefix is None or ref.checksum is None:
        return Path(ref.path)
    final = cache_folder(ref, settings)
    with _LOCK:
        if final in _VERIFIED and final.is_dir():
            return final
        with _machine_lock(settings.model_cache, ref.checksum):
            if final.is_dir():
                problem = verify_folder(final, ref)
                if problem is None:
                    _VERIFIED.add(final)
                    return final
                log.error("cached bundle of model %s at %s is damaged (%s); fetching it again",
                          ref.version, final, problem)
                _discard(final)
            _VERIFIED.discard(final)
            _fetch(ref, storage or get_storage(settings), final, settings.model_cache)
            _VERIFIED.add(final)
            log.info("model %s fetched from %s into %s", ref.version, ref.prefix, final)
    return final


def forget_verified() -> None:
    """Forget which cached folders this process has verified (the next use checks them again)."""
    with _LOCK:
        _VERIFIED.clear()
