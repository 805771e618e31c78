"""A training run's data: decoded images, lesion-grouped splits, label masks and validation sets, in memory."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from skinscan.imaging import decode_rgb
from skinscan.labels import CLASSES
from skinscan.model.bundle import is_timm_architecture, resize_crop
from training.config import TrainConfig
from training.datasets import Dataset, Sample, read_dataset
from training.partial_labels import allowed_mask
from training.perturb import VARIANTS, apply_variant
from training.pretrained import imagenet_preprocessing
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
    samples: list[Sample], resize_size: int, desc: str = "decoding", colour_constancy: str = "none",
    mode: str = "crop",
) -> tuple[np.ndarray, list[int]]:
    """Decode every sample once to a uint8 N x S x S x 3 array (S = resize_size) and its difference hash."""
    out = np.empty((len(samples), resize_size, resize_size, 3), dtype=np.uint8)
    hashes = []
    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", mininterval=2)):
        img = decode_rgb(s.path.read_bytes(), draft_size=resize_size)
        hashes.append(dhash(img))
        out[i] = np.asarray(resize_crop(img, resize_size, resize_size, colour_constancy, mode=mode))
    return out, hashes


def load_variants(
    samples: list[Sample], input_size: int, variants: list[str], colour_constancy: str = "none",
    mode: str = "squash",
) -> dict[str, np.ndarray]:
    """Decode samples at their own size, apply each robustness variant, then the serving preprocessing: one
    uint8 N x S x S x 3 array per variant (what a bundle would see of other clinics' copies of these images)."""
    out = {v: np.empty((len(samples), input_size, input_size, 3), dtype=np.uint8) for v in variants}
    for i, s in enumerate(tqdm(samples, desc="validation variants", unit="img", mininterval=2)):
        rgb = np.asarray(decode_rgb(s.path.read_bytes()))
        for v in variants:
            img = Image.fromarray(apply_variant(v, rgb))
            out[v][i] = np.asarray(resize_crop(img, input_size, input_size, colour_constancy, mode=mode))
    return out


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
    sources: list[str]  # the set each sample comes from (the main set's name, or an extra set's folder/file)


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
    images, hashes = load_images(samples + extra, cfg.resize_size, colour_constancy=cfg.colour_constancy,
                                 mode=cfg.resize_mode)
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
    return Prepared(dataset, images, splits, [dataset.format] * n_main + extra_formats, extra_counts, n_main,
                    [dataset.name] * n_main + extra_names)


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
                                colour_constancy=cfg.colour_constancy, mode=cfg.resize_mode)
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



def source_balanced_weights(
    labels: np.ndarray, masks: np.ndarray, sources: list[str], is_main: np.ndarray, extra_weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Sampling weight of each training sample, and the common class prior they realise.

    The prior is square-root balanced over the main set's class counts. Within every source the labels it can
    tell apart (a class; for ISIC 2017 also "neither melanoma nor keratosis") are sampled at that one prior, so
    the source of an image carries no information about its label: an archive's look cannot stand in for
    melanoma. Sources keep their share of the batch (extra sets x extra_weight per image)."""
    n_classes = masks.shape[1]
    is_main = np.asarray(is_main, dtype=bool)
    counts = np.bincount(labels[is_main], minlength=n_classes).astype(np.float64)
    prior = np.sqrt(counts)
    prior = prior / prior.sum() if prior.sum() else np.full(n_classes, 1.0 / n_classes)
    group_keys = [m.tobytes() for m in masks]
    weights = np.zeros(len(labels))
    keys = [("main", "") if m else ("extra", s) for s, m in zip(sources, is_main, strict=True)]
    for source in dict.fromkeys(keys):
        rows = np.array([i for i, k in enumerate(keys) if k == source])
        share = len(rows) * (1.0 if source[0] == "main" else extra_weight)
        groups: dict[bytes, list[int]] = {}
        for i in rows:
            groups.setdefault(group_keys[i], []).append(i)
        mass = {g: float(prior[masks[ix[0]]].sum()) for g, ix in groups.items()}
        total = sum(mass.values())
        if total <= 0:
            continue
        for g, ix in groups.items():
            weights[ix] = share * mass[g] / total / len(ix)
    return weights, prior


def variant_subset(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Positions of at most cap images per class (all of a rarer class), for the per-epoch robustness check."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        ix = np.flatnonzero(labels == c)
        keep.extend(ix if len(ix) <= cap else rng.choice(ix, cap, replace=False))
    return np.sort(np.asarray(keep, dtype=int))


@dataclass
class RunData:
    """Everything a run trains and validates on, decoded once."""

    prepared: Prepared
    labels: np.ndarray  # class index per sample (ISIC 2017's "neither" as nv)
    masks: np.ndarray  # N x C: classes each sample's label allows
    train_idx: np.ndarray
    val_idx: np.ndarray
    val_images: np.ndarray  # the validation split as scoring sees it
    extra_val: list[ExtraValidation]
    mean: torch.Tensor
    std: torch.Tensor
    interpolation: str
    sample_p: np.ndarray  # sampling probability of each training index
    loss_weights: np.ndarray  # per class
    prior: np.ndarray  # the common class prior every source is sampled at
    val_variant_pos: np.ndarray  # positions in val_idx of the images the robustness variants cover
    val_variants: dict[str, np.ndarray]  # perturbed copies of those images, as scoring sees them

    @property
    def dataset(self) -> Dataset:
        """The samples of the run, main set first."""
        return self.prepared.dataset


def load_run_data(cfg: TrainConfig, run: Path) -> RunData:
    """Prepare a run's images, splits, masks, validation sets and variants, normalisation and sampling."""
    prep = prepare(cfg, run)
    labels = np.array([CLASSES.index(s.label) for s in prep.dataset.samples])
    masks = allowed_mask([s.label for s in prep.dataset.samples], prep.formats)
    tr = np.array([i for i, sp in enumerate(prep.splits) if sp == "train"])
    va = np.array([i for i, sp in enumerate(prep.splits) if sp == "val"])
    if len(tr) == 0 or len(va) == 0:
        raise ValueError("training and validation splits must both be non-empty")
    mean, std, interpolation = preprocessing(cfg, prep.images[tr])
    is_main = tr < prep.n_main
    sample_w, prior = source_balanced_weights(labels[tr], masks[tr], [prep.sources[i] for i in tr], is_main,
                                              cfg.extra_weight)
    # Sampling at the square-root prior and weighting the loss by 1/sqrt(count) amounts to inverse-frequency
    # weighting without the extreme over-sampling of the rarest classes that plain inverse weights cause.
    counts = np.bincount(labels[tr][is_main], minlength=len(CLASSES)).astype(np.float64)
    class_w = 1.0 / np.sqrt(np.maximum(counts, 1))
    loss_w = class_w / (class_w * counts).sum() * counts.sum()
    pos = (variant_subset(labels[va], cfg.variant_cap, cfg.seed) if cfg.variant_cap
           else np.zeros(0, dtype=int))
    variants = [v for v in VARIANTS if v != "clean"]
    val_variants = (load_variants([prep.dataset.samples[i] for i in va[pos]], cfg.input_size, variants,
                                  cfg.colour_constancy, cfg.resize_mode) if len(pos) else {})
    return RunData(
        prepared=prep, labels=labels, masks=masks, train_idx=tr, val_idx=va,
        val_images=np.ascontiguousarray(center(prep.images[va], cfg.input_size)), extra_val=load_extra_val(cfg),
        mean=mean, std=std, interpolation=interpolation, sample_p=sample_w / sample_w.sum(), loss_weights=loss_w,
        prior=prior, val_variant_pos=pos, val_variants=val_variants,
    )
