"""Lesion-grouped, diagnosis-stratified, seeded train/validation/test splits, in a CSV anyone can reuse."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold

from training.datasets import Sample

SPLITS = ("train", "val", "test")

# Near-identical images that their datasets list under different ids (documented by the dataset
# maintainers); a hash alone does not catch them since they were saved with small shifts.
KNOWN_DUPLICATES: tuple[tuple[str, str], ...] = (
    ("ISIC_0026464", "ISIC_0027515"),  # HAM10000, two lesion ids
    ("ISIC_0012175", "ISIC_0015982"),  # ISIC 2017 train-test
    ("ISIC_0012271", "ISIC_0016018"),
    ("ISIC_0012887", "ISIC_0012989"),
    ("ISIC_0013163", "ISIC_0013109"),
    ("ISIC_0012970", "ISIC_0012127"),  # ISIC 2017 train-val
    ("ISIC_0012221", "ISIC_0016002"),  # ISIC 2017 val-test
)


def dhash(img: Image.Image, size: int = 8) -> int:
    """Return a 64-bit difference hash: equal for the same picture re-encoded or resized."""
    gray = np.asarray(img.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (gray[:, 1:] > gray[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def duplicate_groups(samples: Sequence[Sample], hashes: Sequence[int]) -> list[str]:
    """Return a group id per sample joining samples of one lesion and samples whose images hash alike."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    known = {a: b for a, b in KNOWN_DUPLICATES} | {b: a for a, b in KNOWN_DUPLICATES}
    first: dict[tuple[str, object], int] = {}
    for i, (sample, h) in enumerate(zip(samples, hashes, strict=True)):
        twin = known.get(sample.image_id, sample.image_id)
        pair = "/".join(sorted((sample.image_id, twin)))
        for key in (("lesion", sample.lesion_id), ("hash", h), ("known", pair)):
            if key in first:
                union(i, first[key])
            else:
                first[key] = i
    return [samples[find(i)].lesion_id for i in range(len(samples))]


def make_splits(
    samples: Sequence[Sample], groups: Sequence[str], val: float = 0.15, test: float = 0.15, seed: int = 0
) -> list[str]:
    """Assign each sample to train/val/test so no group spans two splits, with diagnoses stratified."""
    labels = np.array([s.label for s in samples])
    groups_arr = np.array(groups)
    assignment = np.array(["train"] * len(samples), dtype=object)
    idx = np.arange(len(samples))
    if test > 0:
        folds = StratifiedGroupKFold(n_splits=max(2, round(1 / test)), shuffle=True, random_state=seed)
        _, test_idx = next(folds.split(idx, labels, groups_arr))
        assignment[test_idx] = "test"
    rest = idx[assignment == "train"]
    if val > 0:
        n_splits = max(2, round((1 - test) / val))
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 1)
        _, val_local = next(folds.split(rest, labels[rest], groups_arr[rest]))
        assignment[rest[val_local]] = "val"
    return [str(a) for a in assignment]


def write_splits(path: Path, samples: Sequence[Sample], groups: Sequence[str], splits: Sequence[str]) -> None:
    """Write image_id, lesion_id, group, label and split per sample to a CSV."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "lesion_id", "group", "label", "split"])
        for s, g, sp in zip(samples, groups, splits, strict=True):
            writer.writerow([s.image_id, s.lesion_id, g, s.label, sp])


def read_splits(path: Path) -> dict[str, str]:
    """Read a split CSV back as image_id -> split."""
    with path.open(newline="") as fh:
        return {row["image_id"]: row["split"] for row in csv.DictReader(fh)}
