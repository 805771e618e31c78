"""Splits on the full HAM10000 metadata: lesion-grouped, duplicates together, stratified, 70/15/15, seeded."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from skinscan.labels import CLASSES
from training.datasets import Sample
from training.splits import KNOWN_DUPLICATES, SPLITS, duplicate_groups, make_splits, read_splits, write_splits

TWINS = ("ISIC_0026464", "ISIC_0027515")


@pytest.fixture(scope="module")
def ham_samples(ham_rows: list[dict[str, str]]) -> list[Sample]:
    """All 10,015 HAM10000 samples from the metadata alone (no image is decoded)."""
    return [Sample(r["image_id"], Path(f"{r['image_id']}.jpg"), r["dx"], r["lesion_id"]) for r in ham_rows]


@pytest.fixture(scope="module")
def ham_groups(ham_samples: list[Sample]) -> list[str]:
    # Distinct fake hashes, so only lesion ids and the known duplicate list can join images.
    return duplicate_groups(ham_samples, list(range(len(ham_samples))))


@pytest.fixture(scope="module")
def ham_splits(ham_samples: list[Sample], ham_groups: list[str]) -> list[str]:
    return make_splits(ham_samples, ham_groups, seed=0)


def test_known_duplicates_join_groups(ham_samples: list[Sample], ham_groups: list[str]) -> None:
    assert TWINS in KNOWN_DUPLICATES
    by_id = {s.image_id: (s, g) for s, g in zip(ham_samples, ham_groups, strict=True)}
    (a, group_a), (b, group_b) = by_id[TWINS[0]], by_id[TWINS[1]]
    assert a.lesion_id != b.lesion_id  # the metadata gives them two lesion ids ...
    assert group_a == group_b  # ... and the grouping puts them together
    # Without the known-duplicate list, lesion ids alone would keep them apart.
    assert len(set(ham_groups)) == len({s.lesion_id for s in ham_samples}) - 1


def test_no_lesion_in_two_splits(ham_samples: list[Sample], ham_splits: list[str]) -> None:
    splits_of: dict[str, set[str]] = defaultdict(set)
    for sample, split in zip(ham_samples, ham_splits, strict=True):
        splits_of[sample.lesion_id].add(split)
    assert len(splits_of) == 7470
    assert all(len(s) == 1 for s in splits_of.values())
    by_id = dict(zip((s.image_id for s in ham_samples), ham_splits, strict=True))
    assert by_id[TWINS[0]] == by_id[TWINS[1]]


def test_fractions_and_stratification(ham_samples: list[Sample], ham_splits: list[str]) -> None:
    counts = Counter(ham_splits)
    assert set(counts) == set(SPLITS)
    total = len(ham_samples)
    assert abs(counts["train"] / total - 0.70) < 0.03
    assert abs(counts["val"] / total - 0.15) < 0.03
    assert abs(counts["test"] / total - 0.15) < 0.03
    overall = Counter(s.label for s in ham_samples)
    for split in SPLITS:
        labels = Counter(s.label for s, sp in zip(ham_samples, ham_splits, strict=True) if sp == split)
        assert set(labels) == set(CLASSES), f"{split} lacks a class"
        for label in CLASSES:  # each class keeps roughly its overall share
            assert abs(labels[label] / counts[split] - overall[label] / total) < 0.03


def test_seeded(
    ham_samples: list[Sample], ham_groups: list[str], ham_splits: list[str], tmp_path: Path
) -> None:
    assert make_splits(ham_samples, ham_groups, seed=0) == ham_splits
    assert make_splits(ham_samples, ham_groups, seed=1) != ham_splits
    write_splits(tmp_path / "splits.csv", ham_samples, ham_groups, ham_splits)
    expected = {s.image_id: sp for s, sp in zip(ham_samples, ham_splits, strict=True)}
    assert read_splits(tmp_path / "splits.csv") == expected
