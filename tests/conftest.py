"""Shared fixtures: the real datasets under ../shared/data, small cuts of them, and a small trained bundle."""

from __future__ import annotations

import csv
import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAM_DIR = DATA / "HAM10000"
ISIC2017_DIR = DATA / "ISIC2017"
HAM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]

# Settings of the smoke-trained bundle, quick on two CPU cores: the shipped recipe (EfficientNet-Lite0 from the
# installed ImageNet weights) at a small input size, with Shades of Gray so its serving path is tested too. The
# pretrained features make outputs differ from image to image after a few steps, so the evaluation and
# backend-agreement tests are not vacuous.
SMOKE_ARCH = "tf_efficientnet_lite0"
SMOKE_INPUT = 64
SMOKE_IMAGES = 150


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[Callable[[], Any]]:
    """load_settings() keeps what it read for the process: each test starts and ends with it cleared, and a test
    that changes the environment after settings were read calls this fixture's value for settings read again."""
    from skinscan.settings import load_settings

    def read_again() -> Any:
        load_settings.cache_clear()
        return load_settings()

    load_settings.cache_clear()
    yield read_again
    load_settings.cache_clear()


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """The real HAM10000 folder; skips when the shared data is not there."""
    if not (HAM_DIR / "HAM10000_metadata.csv").is_file() or not (HAM_DIR / "images").is_dir():
        pytest.skip(f"HAM10000 not found at {HAM_DIR} (see ../shared/data/README.md)")
    return HAM_DIR


@pytest.fixture(scope="session")
def isic2017_dir() -> Path:
    """The real ISIC 2017 folder; skips when the shared data is not there."""
    if not (ISIC2017_DIR / "ISIC-2017_Test_v2_Part3_GroundTruth.csv").is_file():
        pytest.skip(f"ISIC 2017 not found at {ISIC2017_DIR} (see ../shared/data/README.md)")
    return ISIC2017_DIR


@pytest.fixture(scope="session")
def ham_rows(ham_dir: Path) -> list[dict[str, str]]:
    """Every row of the real HAM10000 metadata, in file order."""
    with (ham_dir / "HAM10000_metadata.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def pick_stratified(rows: Sequence[dict[str, str]], n: int, key: str = "dx") -> list[dict[str, str]]:
    """Return n rows taken round-robin over the values of key (sorted), so every class is represented."""
    by_class: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.get("image_id", "")):
        by_class[row[key]].append(row)
    out: list[dict[str, str]] = []
    queues = [list(by_class[c]) for c in sorted(by_class)]
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


@pytest.fixture(scope="session")
def pick_ham(ham_rows: list[dict[str, str]]) -> Callable[..., list[dict[str, str]]]:
    """Factory: n real HAM10000 metadata rows picked round-robin over diagnoses, after skipping `offset`."""

    def pick(n: int, offset: int = 0) -> list[dict[str, str]]:
        return pick_stratified(ham_rows, n + offset)[offset:]

    return pick


@pytest.fixture(scope="session")
def make_ham_subset(ham_dir: Path, ham_rows: list[dict[str, str]]) -> Callable[..., Path]:
    """Factory: build a HAM10000-layout folder of symlinks to n real images with a cut metadata CSV.

    layout "images" puts them in images/; "parts" splits them over HAM10000_images_part_1/ and _part_2/ as
    in the official download. Rows are picked round-robin over diagnoses, skipping the first `offset`.
    """

    def make(dest: Path, n: int, layout: str = "images", offset: int = 0) -> Path:
        rows = pick_stratified(ham_rows, n + offset)[offset:]
        dest.mkdir(parents=True, exist_ok=True)
        folders = (["images"] if layout == "images"
                   else ["HAM10000_images_part_1", "HAM10000_images_part_2"])
        for folder in folders:
            (dest / folder).mkdir(exist_ok=True)
        for i, row in enumerate(rows):
            name = f"{row['image_id']}.jpg"
            (dest / folders[i % len(folders)] / name).symlink_to(ham_dir / "images" / name)
        with (dest / "HAM10000_metadata.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=HAM_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return dest

    return make


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, make_ham_subset: Callable[..., Path]) -> Path:
    """A run folder of `skinscan train` for one epoch on 150 real HAM10000 images (SMOKE_ARCH, EfficientNet-Lite0, at
    64 px, with Shades of Gray)."""
    from skinscan.cli import main

    data = make_ham_subset(tmp_path_factory.mktemp("ham-train"), SMOKE_IMAGES)
    run = tmp_path_factory.mktemp("smoke") / "run"
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.INFO)
    try:
        code = main([
            "train", "--data", str(data), "--out", str(run), "--arch", SMOKE_ARCH,
            "--input-size", str(SMOKE_INPUT), "--epochs", "1", "--batch-size", "32", "--threads", "2",
            "--version", "smoke-test", "--colour-constancy", "shades_of_gray",  # the serving path with it
        ])
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:  # the run's train.log handler
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    assert code == 0
    return run


@pytest.fixture()
def smoke_bundle(smoke_run: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the smoke run's bundle, which a test may change or break."""
    dest = tmp_path / "bundle"
    shutil.copytree(smoke_run / "bundle", dest)
    yield dest
