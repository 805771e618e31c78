"""Model bundles shipped inside the package; `default/` holds the bundle used when none is named."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BUNDLE_DIR = Path(__file__).parent / "default"


def default_bundle_path() -> Path:
    """Return the packaged default bundle folder, raising BundleError when no bundle is installed there."""
    path = DEFAULT_BUNDLE_DIR
    if not (path / "metadata.json").is_file():
        from skinscan.model.bundle import BundleError

        raise BundleError(
            f"no default model bundle is installed at {path}: pass a bundle folder explicitly (--model), or "
            "copy the bundle/ folder of a `skinscan train` run there"
        )
    return path
