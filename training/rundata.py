"""A training run's data: decoded images, lesion-grouped splits, label masks and validation sets, in memory."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from skinscan.imaging import decode_rgb
from skinscan.labels import CLASSES
from training.bundle import resize_crop
from training.config import TrainConfig
from training.datasets import Dataset, Sample, read_dataset
from training.partial_labels import allowed_mask
from training.pretrained import imagenet_preprocessing, is_timm_architecture
from training.splits import (
    KNOWN_DUPLICATES,
    dhash,
    duplicate_groups,
    make_splits,
    read_splits,
    write_splits,
)

log = logging.getLogger(__name__)


def load_images(
    samples: list[Sample], resize_size: int, desc: str = "decoding", colour_constancy: str = "none"
) -> tuple[np.ndarray, list[int]]:
    """Decode every sample once to a uint8 N x S x S x 3 array (S = resize_size) and its difference hash."""
    out = np.empty((len(samples), resize_size, resize_size, 3), dtype=np.uint8)
    hashes = []
    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", mininterval=2)):
        img = decode_rgb(s.path.read_bytes(), draft_size=resize_size)
        hashes.append(dhash(img))
        out[i] = np.asarray(resize_crop(img, resize_size, resize_size, colour_constancy))
    return out, hashes


def center(images: np.ndarray, input_size: int) -> np.ndarray:
    """Centre-crop N x S x S x 3 images to input_size (what scoring sees)."""
    s = images.shape[1]
    o = (s - input_size) // 2
    return images[:, o : o + input_size, o : o + input_size]


def _holdout_keys(paths: list[str], resize_size: int) -> tuple[set[int], set[str]]:
    """Return the image hashes and ids (with their known twins) of held-out sets, so training can avoid them."""
    twins = {a: b for a, b in KNOWN_DUPLICATES} | {b: a for a, b in KNOWN_DUPLICATES}
    hashes: set[int] = set()
    ids: set[str] = set()
    for path in paths:
        for s in tqdm(read_dataset(path).samples, desc=f"hashing {Path(path).name}", unit="img", mininterval=2):
            hashes.add(dhash(decode_rgb(s.path.read_bytes(), draft_size=resize_size)))
            ids.update({s.image_id, twins.get(s.image_id, s.image_id)})
    return hashes, ids


@dataclass
class Prepared:
    """The decoded images of a run with their splits, source formats and allowed-class masks."""

    dataset: Dataset
    images: np.ndarray
    splits: list[str]
    formats: list[str]
    extra_counts: dict[str, int]
    n_main: int  # samples of the main dataset come first, then the extra training sets'


def prepare(cfg: TrainConfig, run: Path) -> Prepared:
    """Read the main and extra sets, drop held-out duplicates, split by lesion and write splits.csv."""
    dataset = read_dataset(cfg.data)
    samples = dataset.samples
    if cfg.limit:
        rng = random.Random(cfg.seed)
        samples = rng.sample(samples, min(cfg.limit, len(samples)))
        dataset = Dataset(dataset.name, dataset.format, samples, dataset.known_labels)
    extra: list[Sample] = []
    extra_formats: list[str] = []
    extra_names: list[str] = []
    for path in cfg.extra_train:
        ds = read_dataset(path)
        extra += ds.samples
        extra_formats += [ds.format] * len(ds.samples)
        extra_names += [Path(path).name] * len(ds.samples)
    n_main = len(samples)
    images, hashes = load_images(samples + extra, cfg.resize_size, colour_constancy=cfg.colour_constancy)
    if extra:
        held_hashes, held_ids = _holdout_keys(list(dict.fromkeys(cfg.holdout + cfg.extra_val)), cfg.resize_size)
        keep = [i for i, s in enumerate(extra)
                if hashes[n_main + i] not in held_hashes and s.image_id not in held_ids]
        log.info("extra training images: %d of %d kept (%d match a held-out image)",
                 len(keep), len(extra), len(extra) - len(keep))
        rows = np.concatenate([np.arange(n_main), n_main + np.array(keep, dtype=int)])
        images, hashes = images[rows], [hashes[i] for i in rows]
        extra = [extra[i] for i in keep]
        extra_formats = [extra_formats[i] for i in keep]
        extra_names = [extra_names[i] for i in keep]
    every = samples + extra
    groups = duplicate_groups(every, hashes)
    split_file = run / "splits.csv"
    if cfg.splits or split_file.exists():
        by_id = read_splits(Path(cfg.splits) if cfg.splits else split_file)
        splits = [by_id.get(s.image_id, "unused") for s in samples]
    else:
        splits = make_splits(samples, groups[:n_main], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    # An extra image trains only if nothing it duplicates is in validation or test.
    not_train = {g for g, sp in zip(groups, splits, strict=False) if sp != "train"}
    splits += ["unused" if g in not_train else "train" for g in groups[n_main:]]
    write_splits(split_file, every, groups, splits)
    extra_counts: dict[str, int] = {}
    for name, sp in zip(extra_names, splits[n_main:], strict=True):
        if sp == "train":
            extra_counts[name] = extra_counts.get(name, 0) + 1
    dataset = Dataset(dataset.name, dataset.format, every, dataset.known_labels)
    counts = {sp: sum(1 for x in splits if x == sp) for sp in ("train", "val", "test")}
    log.info("dataset %s (%s): %d images (%d extra), splits %s", dataset.name, dataset.format, len(every),
             len(extra), counts)
    return Prepared(dataset, images, splits, [dataset.format] * n_main + extra_formats, extra_counts, n_main)


@dataclass
class ExtraValidation:
    """A set of another clinic used for model choice: its centre crops and melanoma labels."""

    name: str
    images: np.ndarray
    melanoma: np.ndarray


def load_extra_val(cfg: TrainConfig) -> list[ExtraValidation]:
    """Decode the extra validation sets at the input size, with their melanoma labels."""
    out = []
    for path in cfg.extra_val:
        ds = read_dataset(path)
        images, _ = load_images(ds.samples, cfg.resize_size, desc=f"decoding {Path(path).name}",
                                colour_constancy=cfg.colour_constancy)
        y = np.array([s.label == "mel" for s in ds.samples], dtype=int)
        out.append(ExtraValidation(Path(path).name, np.ascontiguousarray(center(images, cfg.input_size)), y))
    return out


def preprocessing(cfg: TrainConfig, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Mean, std and interpolation: the pretrained weights' own, else measured on the training images."""
    if cfg.pretrained == "imagenet" and is_timm_architecture(cfg.arch):
        pre = imagenet_preprocessing(cfg.arch)
        mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pre["std"], dtype=torch.float32).view(1, 3, 1, 1)
        return mean, std, "bilinear"
    pixels = images[:2000].reshape(-1, 3)
    mean = torch.tensor(pixels.mean(0) / 255.0, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pixels.std(0) / 255.0, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std, "bilinear"



@dataclass
class RunData:
    """Everything a run trains and validates on, decoded once."""

    prepared: Prepared
    labels: np.ndarray  # class index per sample (ISIC 2017's "neither" as nv)
    masks: np.ndarray  # N x C: classes each sample's label allows
    train_idx: np.ndarray
    val_idx: np.ndarray
    val_images: np.ndarray  # centre crops of the validation split
    extra_val: list[ExtraValidation]
    mean: torch.Tensor
    std: torch.Tensor
    interpolation: str
    sample_p: np.ndarray  # sampling probability of each training index
    loss_weights: np.ndarray  # per class

    @property
    def dataset(self) -> Dataset:
        """The samples of the run, main set first."""
        return self.prepared.dataset


def load_run_data(cfg: TrainConfig, run: Path) -> RunData:
    """Prepare a run's images, splits, masks, validation sets, normalisation and class-balanced sampling."""
    prep = prepare(cfg, run)
    labels = np.array([CLASSES.index(s.label) for s in prep.dataset.samples])
    masks = allowed_mask([s.label for s in prep.dataset.samples], prep.formats)
    tr = np.array([i for i, sp in enumerate(prep.splits) if sp == "train"])
    va = np.array([i for i, sp in enumerate(prep.splits) if sp == "val"])
    if len(tr) == 0 or len(va) == 0:
        raise ValueError("training and validation splits must both be non-empty")
    mean, std, interpolation = preprocessing(cfg, prep.images[tr])
    counts = np.bincount(labels[tr], minlength=len(CLASSES)).astype(np.float64)
    # Square-root rebalancing twice (in the sampler and in the loss) amounts to inverse-frequency weighting
    # without the extreme over-sampling of the rarest classes that plain inverse weights cause.
    class_w = 1.0 / np.sqrt(np.maximum(counts, 1))
    loss_w = class_w / (class_w * counts).sum() * counts.sum()
    source_w = np.where(np.arange(len(prep.splits)) >= prep.n_main, cfg.extra_weight, 1.0)
    sample_w = class_w[labels[tr]] * source_w[tr]
    return RunData(
        prepared=prep, labels=labels, masks=masks, train_idx=tr, val_idx=va,
        val_images=np.ascontiguousarray(center(prep.images[va], cfg.input_size)), extra_val=load_extra_val(cfg),
        mean=mean, std=std, interpolation=interpolation, sample_p=sample_w / sample_w.sum(), loss_weights=loss_w,
    )
