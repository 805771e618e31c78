"""The bundle store without services: upload to a local storage folder, fetch into a cache atomically, checksums.

The storage is the embedded LocalStorage on tmp_path (a real folder, as `skinscan serve` uses); the bundle is a
folder with metadata.json, checksummed weights and a model card, as training.export writes them (no network is
built: the store only moves and checks files).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from skinscan.model.store import (
    MANIFEST_FILE,
    BundleRef,
    BundleStoreError,
    bundle_checksum,
    cache_folder,
    forget_verified,
    local_bundle,
    upload_bundle,
)
from skinscan.storage import LocalStorage, StorageError

VERSION = "fast-bundle v1/x"  # a space and a slash: the storage key and the cache folder must still be safe


class CountingStorage(LocalStorage):
    """The local folder storage, counting reads and optionally failing the n-th one (an outage mid-fetch)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets = 0
        self.fail_at: int | None = None

    def get(self, key: str) -> bytes:
        """Read an object, counting (and failing the fail_at-th read)."""
        self.gets += 1
        if self.fail_at is not None and self.gets == self.fail_at:
            raise StorageError(f"connection reset while reading {key}")
        return super().get(key)


def make_bundle(folder: Path, weights: bytes = b"weights-" * 1000) -> Path:
    """A bundle folder: weights, metadata with their checksum, a model card and an evaluation plot."""
    folder.mkdir(parents=True)
    (folder / "weights.pt").write_bytes(weights)
    (folder / "MODEL_CARD.md").write_text("# The card of the fast bundle\n")
    (folder / "test-set_roc.png").write_bytes(b"\x89PNG fake plot bytes")
    meta = {"architecture": "resnet18", "classes": ["mel", "nv"], "input_size": 8, "resize_size": 9,
            "mean": [0.5] * 3, "std": [0.2] * 3, "version": VERSION,
            "checksums": {"weights.pt": hashlib.sha256(weights).hexdigest()}}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Settings with a cache folder of their own, a storage folder, and an uploaded bundle (source deleted)."""
    from skinscan.settings import load_settings

    monkeypatch.setenv("SKINSCAN_DATA_DIR", str(tmp_path / "machine"))
    monkeypatch.delenv("SKINSCAN_MODEL_CACHE_DIR", raising=False)
    forget_verified()
    storage = CountingStorage(tmp_path / "objects")
    source = make_bundle(tmp_path / "source")
    stored = upload_bundle(storage, source, VERSION)
    for path in sorted(source.rglob("*"), reverse=True):
        path.unlink()
    source.rmdir()
    ref = BundleRef(VERSION, stored.prefix, stored.checksum, str(source))
    yield {"settings": load_settings(), "storage": storage, "stored": stored, "ref": ref}
    forget_verified()


def test_upload_keys_by_version_and_checksum(env: dict[str, Any]) -> None:
    stored, storage = env["stored"], env["storage"]
    assert stored.prefix == f"models/fast-bundle_v1_x/{stored.checksum}/"
    assert stored.checksum == bundle_checksum(VERSION, stored.files)
    assert set(stored.files) == {"weights.pt", "metadata.json", "MODEL_CARD.md", "test-set_roc.png"}
    assert sorted(storage.list_keys("models/")) == sorted(
        [stored.prefix + n for n in stored.files] + [stored.prefix + MANIFEST_FILE])
    assert hashlib.sha256(storage.get(stored.prefix + MANIFEST_FILE)).hexdigest() == stored.checksum


def test_cache_setting_defaults_under_data_dir(env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               fresh_settings: Callable[[], Any]) -> None:
    assert env["settings"].model_cache == tmp_path / "machine" / "model-cache"
    monkeypatch.setenv("SKINSCAN_MODEL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert fresh_settings().model_cache == tmp_path / "elsewhere"


def test_first_use_fetches_then_cache_serves(env: dict[str, Any]) -> None:
    settings, storage, ref = env["settings"], env["storage"], env["ref"]
    folder = local_bundle(ref, settings, storage)
    assert folder == cache_folder(ref, settings) and folder.parent.parent == settings.model_cache
    assert (folder / "MODEL_CARD.md").read_text() == "# The card of the fast bundle\n"
    assert (folder / "weights.pt").read_bytes() == b"weights-" * 1000
    reads = storage.gets
    assert reads == 5  # the manifest and four files
    assert local_bundle(ref, settings, storage) == folder and storage.gets == reads  # verified once per process
    forget_verified()  # another process on the same machine: checks the cached copy, downloads nothing
    assert local_bundle(ref, settings, storage) == folder and storage.gets == reads
    assert not [p for p in settings.model_cache.rglob(".fetch-*")]


def test_damaged_cached_file_is_fetched_again(env: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    settings, storage, ref = env["settings"], env["storage"], env["ref"]
    folder = local_bundle(ref, settings, storage)
    (folder / "weights.pt").write_bytes(b"flipped bits")
    forget_verified()
    assert local_bundle(ref, settings, storage) == folder
    assert (folder / "weights.pt").read_bytes() == b"weights-" * 1000
    assert "weights.pt does not match its checksum" in caplog.text
    (folder / "MODEL_CARD.md").unlink()  # a missing file too
    forget_verified()
    assert (local_bundle(ref, settings, storage) / "MODEL_CARD.md").is_file()


def test_damaged_stored_object_is_refused_and_leaves_nothing(env: dict[str, Any]) -> None:
    settings, storage, ref = env["settings"], env["storage"], env["ref"]
    storage.put(ref.prefix + "weights.pt", b"a different model")
    with pytest.raises(BundleStoreError, match="weights.pt of model .* does not match its checksum"):
        local_bundle(ref, settings, storage)
    assert not cache_folder(ref, settings).exists()
    assert not [p for p in settings.model_cache.rglob("*") if p.is_dir()]  # no half-fetched folder


def test_manifest_must_match_the_registered_checksum(env: dict[str, Any]) -> None:
    settings, storage, ref = env["settings"], env["storage"], env["ref"]
    wrong = BundleRef(ref.version, ref.prefix, "0" * 64, ref.path)
    with pytest.raises(BundleStoreError, match="does not match its registered checksum"):
        local_bundle(wrong, settings, storage)
    other = BundleRef("another-version", ref.prefix, ref.checksum, ref.path)
    with pytest.raises(BundleStoreError, match="not another-version"):
        local_bundle(other, settings, storage)


def test_fetch_interrupted_by_an_outage_leaves_no_folder_then_succeeds(env: dict[str, Any]) -> None:
    settings, storage, ref = env["settings"], env["storage"], env["ref"]
    storage.fail_at = 3
    with pytest.raises(StorageError):
        local_bundle(ref, settings, storage)
    assert not cache_folder(ref, settings).exists()
    assert not [p for p in settings.model_cache.rglob("*") if p.is_dir()]
    storage.fail_at = None
    assert (local_bundle(ref, settings, storage) / "weights.pt").is_file()


def test_bad_file_names_are_refused(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b")
    (folder / "bad name!.txt").write_text("x")
    with pytest.raises(BundleStoreError, match="not allowed"):
        upload_bundle(LocalStorage(tmp_path / "objects"), folder, VERSION)


def test_hidden_files_and_an_old_manifest_are_not_uploaded(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b")
    (folder / ".DS_Store").write_text("x")
    (folder / MANIFEST_FILE).write_text("{}")  # re-registering a cached copy
    os.makedirs(folder / "__pycache__")
    (folder / "__pycache__" / "x.pyc").write_bytes(b"x")
    stored = upload_bundle(LocalStorage(tmp_path / "objects"), folder, VERSION)
    assert set(stored.files) == {"weights.pt", "metadata.json", "MODEL_CARD.md", "test-set_roc.png"}


def test_a_version_registered_before_bundles_were_stored_is_its_folder(env: dict[str, Any], tmp_path: Path) -> None:
    legacy = BundleRef("legacy", None, None, str(tmp_path / "old-bundle"))
    assert local_bundle(legacy, env["settings"]) == tmp_path / "old-bundle"
