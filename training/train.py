"""`skinscan train`: lesion-grouped splits, class-balanced training, checkpoints, calibration, bundle."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision.transforms import v2
from tqdm import tqdm

from skinscan.imaging import decode_rgb
from skinscan.labels import CLASSES, MALIGNANT
from training.bundle import create_model, save_bundle
from training.calibration import fit_temperature, operating_points, referral_threshold, softmax
from training.colour import METHODS as COLOUR_METHODS
from training.colour import apply_colour_constancy
from training.datasets import Dataset, Sample, read_dataset
from training.metrics import classification_report
from training.partial_labels import allowed_mask, partial_label_loss
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


@dataclass
class TrainConfig:
    """Everything a run depends on; written to args.json so the run can be repeated or resumed."""

    data: str
    out: str
    arch: str = "tf_efficientnet_lite0"
    input_size: int = 160
    resize_size: int = 0  # 0: input_size (HAM10000's 200x150 images keep their whole height)
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3  # the new head's; the pretrained backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.3
    weight_decay: float = 0.02
    label_smoothing: float = 0.05
    warmup_epochs: float = 0.5
    ema_decay: float = 0.998  # 0: no weight EMA; otherwise the EMA and the raw weights both compete on validation
    colour_constancy: str = "shades_of_gray"
    extra_weight: float = 2.0  # sampling weight of an extra training image relative to a main one
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    pretrained: str | None = "imagenet"
    device: str = "auto"
    threads: int = 0
    limit: int = 0  # use at most this many images (for smoke tests)
    splits: str | None = None  # reuse an existing split CSV
    referral_sensitivity: float = 0.92  # malignant (mel, bcc, akiec) sensitivity the default flag keeps on validation
    version: str | None = None
    # Other collections whose every image joins the training split (e.g. ISIC 2017's official training part),
    # and held-out sets whose images (and near-duplicates of them) must never be trained on.
    extra_train: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=list)
    # Sets of other clinics used for model choice alongside the main validation split (never trained on).
    extra_val: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.resize_size:
            self.resize_size = self.input_size
        if self.colour_constancy not in COLOUR_METHODS:
            raise ValueError(f"colour_constancy must be one of {', '.join(COLOUR_METHODS)}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def pick_device(name: str) -> torch.device:
    """Return cuda when available (or asked for), else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resize_crop(img: Image.Image, resize_size: int, crop: int, colour_constancy: str = "none") -> Image.Image:
    """Resize the shorter side to resize_size, correct colour, centre-crop a square of side crop (as the bundle)."""
    width, height = img.size
    scale = resize_size / min(width, height)
    new = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    img = img.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)
    if colour_constancy != "none":
        img = Image.fromarray(apply_colour_constancy(np.asarray(img), colour_constancy))
    left, top = (new[0] - crop) // 2, (new[1] - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


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


class _Rotate90:
    """Rotate by a random multiple of 90 degrees (lossless, no corners to fill)."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return torch.rot90(img, int(torch.randint(4, ()).item()), dims=(-2, -1))


def _augment(input_size: int) -> v2.Compose:
    """Dermoscopy augmentation: lesions have no up or left, so flips and 90-degree rotations (a small free
    rotation besides); random resized crops and some zoom-out (other collections frame lesions smaller, with dark
    dermoscope corners); colour, brightness and a little blur, as cameras, lighting and focus differ."""
    return v2.Compose([
        v2.RandomApply([v2.RandomZoomOut(fill=0, side_range=(1.0, 1.5))], p=0.2),
        v2.RandomResizedCrop(input_size, scale=(0.35, 1.0), ratio=(0.75, 1.33), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        _Rotate90(),
        v2.RandomApply([v2.RandomRotation(20)], p=0.25),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.04),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.2))], p=0.15),
    ])


def _normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((batch.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)


def _center(images: np.ndarray, input_size: int) -> np.ndarray:
    s = images.shape[1]
    o = (s - input_size) // 2
    return images[:, o : o + input_size, o : o + input_size]


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
    batch_size: int = 128, tta: bool = False,
) -> np.ndarray:
    """Return logits for N x S x S x 3 uint8 images already centre-cropped to the input size."""
    model.eval()
    outs = []
    amp = _amp_dtype(device)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        x = _normalize(x.to(device, non_blocking=True), mean.to(device), std.to(device))
        views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)] if tta else [x]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = torch.stack([model(v).float() for v in views]).mean(0)
        outs.append(logits.cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, len(CLASSES)), dtype=np.float32)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, fp16 on older GPUs, none on CPU (bf16 autocast is slow there)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _lr_at(step: float, total: float, warmup: float, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1.0, total - warmup)
    return base * 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))


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


def _prepare(cfg: TrainConfig, run: Path) -> Prepared:
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


def _load_extra_val(cfg: TrainConfig) -> list[ExtraValidation]:
    out = []
    for path in cfg.extra_val:
        ds = read_dataset(path)
        images, _ = load_images(ds.samples, cfg.resize_size, desc=f"decoding {Path(path).name}",
                                colour_constancy=cfg.colour_constancy)
        y = np.array([s.label == "mel" for s in ds.samples], dtype=int)
        out.append(ExtraValidation(Path(path).name, np.ascontiguousarray(_center(images, cfg.input_size)), y))
    return out


def _preprocessing(cfg: TrainConfig, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, str]:
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


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Head at the full learning rate, a pretrained backbone at lr * backbone_lr_scale; no decay on norms/biases."""
    head_names = {n for n, _ in model.named_parameters() if n.split(".")[0] in ("fc", "classifier", "head")}
    scale = cfg.backbone_lr_scale if cfg.pretrained else 1.0
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for pname, param in model.named_parameters():
        key = (pname in head_names, param.ndim <= 1)
        groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr_scale": 1.0 if is_head else scale,
         "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        for (is_head, no_decay), params in groups.items()
    ]


def _selection_score(report: dict[str, Any], extra: dict[str, float | None]) -> float:
    """Model choice: main validation balanced accuracy, averaged with each other clinic's melanoma AUC."""
    figures = [report["balanced_accuracy"]] + [v for v in extra.values() if v is not None]
    return float(np.mean(figures))


def _validate(
    model: torch.nn.Module, val_images: np.ndarray, y_val: np.ndarray, extra_val: list[ExtraValidation],
    mean: torch.Tensor, std: torch.Tensor, device: torch.device,
) -> tuple[dict[str, Any], dict[str, float | None], float]:
    logits = predict_logits(model, val_images, mean, std, device)
    report = classification_report(y_val, softmax(logits))
    extra: dict[str, float | None] = {}
    mel = CLASSES.index("mel")
    for ev in extra_val:
        probs = softmax(predict_logits(model, ev.images, mean, std, device))
        extra[ev.name] = (float(roc_auc_score(ev.melanoma, probs[:, mel]))
                          if 0 < ev.melanoma.sum() < len(ev.melanoma) else None)
    return report, extra, _selection_score(report, extra)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train a model as configured, checkpointing every epoch, and write the calibrated bundle; return it."""
    run = Path(cfg.out)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    args_file = run / "args.json"
    if resume and args_file.exists():
        saved = json.loads(args_file.read_text())
        # The run folder is where it is now, even if it was moved or copied since.
        saved.update({"out": cfg.out, "epochs": cfg.epochs, "device": cfg.device, "threads": cfg.threads,
                      "referral_sensitivity": cfg.referral_sensitivity, "version": cfg.version or saved.get("version")})
        cfg = TrainConfig(**saved)
    args_file.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    prep = _prepare(cfg, run)
    dataset, images, splits = prep.dataset, prep.images, prep.splits
    labels = np.array([CLASSES.index(s.label) for s in dataset.samples])
    masks = allowed_mask([s.label for s in dataset.samples], prep.formats)
    tr = np.array([i for i, sp in enumerate(splits) if sp == "train"])
    va = np.array([i for i, sp in enumerate(splits) if sp == "val"])
    if len(tr) == 0 or len(va) == 0:
        raise ValueError("training and validation splits must both be non-empty")
    mean, std, interpolation = _preprocessing(cfg, images[tr])
    val_images = np.ascontiguousarray(_center(images[va], cfg.input_size))
    extra_val = _load_extra_val(cfg)

    model = create_model(cfg.arch, len(CLASSES), cfg.pretrained).to(device, memory_format=torch.channels_last)
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay > 0 else None)
    counts = np.bincount(labels[tr], minlength=len(CLASSES)).astype(np.float64)
    # Square-root rebalancing twice (in the sampler and in the loss) amounts to inverse-frequency weighting
    # without the extreme over-sampling of the rarest classes that plain inverse weights cause.
    class_w = 1.0 / np.sqrt(np.maximum(counts, 1))
    loss_w = torch.tensor(class_w / (class_w * counts).sum() * counts.sum(), dtype=torch.float32,
                          device=device)
    source_w = np.where(np.arange(len(splits)) >= prep.n_main, cfg.extra_weight, 1.0)
    sample_w = class_w[labels[tr]] * source_w[tr]
    sample_p = sample_w / sample_w.sum()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    augment = _augment(cfg.input_size)
    steps_per_epoch = max(1, len(tr) // cfg.batch_size)

    start_epoch, best_score, history = 0, -1.0, []
    last = run / "checkpoints" / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, history = state["epoch"] + 1, state["best_score"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        log.info("resumed from epoch %d (best selection score %.4f)", start_epoch, best_score)

    masks_t = torch.from_numpy(masks)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        order = rng.choice(tr, size=steps_per_epoch * cfg.batch_size, replace=True, p=sample_p)
        total_loss = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   mininterval=5)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            raw = torch.from_numpy(images[idx]).permute(0, 3, 1, 2)
            x = torch.stack([augment(img) for img in raw])
            x = x.pin_memory() if device.type == "cuda" else x
            x = _normalize(x, mean, std).to(device, non_blocking=True)
            y = torch.from_numpy(labels[idx]).to(device, non_blocking=True)
            mask = masks_t[idx].to(device, non_blocking=True)
            lr = _lr_at(epoch * steps_per_epoch + step, cfg.epochs * steps_per_epoch,
                        cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x)
            loss = partial_label_loss(logits, mask, loss_w[y], cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            total_loss += loss.item()
            bar.set_postfix(loss=f"{total_loss / (step + 1):.3f}")
        seconds = time.time() - t0
        entry: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": total_loss / steps_per_epoch, "seconds": seconds,
            "images_per_second": steps_per_epoch * cfg.batch_size / seconds,
        }
        candidates = [("raw", model)] + ([("ema", ema.module)] if ema is not None else [])
        for name, net in candidates:
            report, extra, score = _validate(net, val_images, labels[va], extra_val, mean, std, device)
            prefix = "val" if name == "raw" else "ema_val"
            entry |= {
                f"{prefix}_balanced_accuracy": report["balanced_accuracy"], f"{prefix}_accuracy": report["accuracy"],
                f"{prefix}_macro_auc": report["macro_auc"], f"{prefix}_melanoma_auc": report["melanoma"]["auc"],
                f"{prefix}_score": score,
            } | {f"{prefix}_melanoma_auc[{k}]": v for k, v in extra.items()}
            if score > best_score:
                best_score = score
                torch.save({"model": net.state_dict(), "epoch": epoch + 1, "weights": name, "score": score},
                           run / "checkpoints" / "best.pt")
        history.append(entry)
        log.info("epoch %s", json.dumps(entry))
        with (run / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        torch.save({
            "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best_score": best_score, "history": history,
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
        }, last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)

    return _finalize(cfg, run, model, prep, labels, va, val_images, extra_val, mean, std, interpolation, device,
                     history)


def _finalize(
    cfg: TrainConfig, run: Path, model: torch.nn.Module, prep: Prepared, labels: np.ndarray, va: np.ndarray,
    val_images: np.ndarray, extra_val: list[ExtraValidation], mean: torch.Tensor, std: torch.Tensor,
    interpolation: str, device: torch.device, history: list[dict[str, Any]],
) -> Path:
    dataset = prep.dataset
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(best["model"])
    model.to(device)
    logits = predict_logits(model, val_images, mean, std, device)
    temperature = fit_temperature(logits, labels[va])
    before = classification_report(labels[va], softmax(logits))
    after = classification_report(labels[va], softmax(logits, temperature))
    probs = softmax(logits, temperature)
    malignant = [CLASSES.index(c) for c in sorted(MALIGNANT)]
    y_malignant = np.isin(labels[va], malignant).astype(int)
    score = probs[:, malignant].sum(1)
    threshold = referral_threshold(y_malignant, score, cfg.referral_sensitivity)
    points = operating_points(y_malignant, score)
    _, extra_auc, _ = _validate(model, val_images, labels[va], extra_val, mean, std, device)
    created = datetime.now(UTC)
    version = cfg.version or f"{created:%Y%m%d}-{cfg.arch}-{cfg.input_size}px-s{cfg.seed}"
    splits = np.array(prep.splits)
    n_main = prep.n_main
    meta = {
        "name": f"skinscan-{dataset.format}-{cfg.arch}",
        "version": version,
        "architecture": cfg.arch,
        "initialisation": "ImageNet (installed package weights)" if cfg.pretrained == "imagenet"
        else (f"warm start from {Path(cfg.pretrained).name}" if cfg.pretrained else "random"),
        "input_size": cfg.input_size,
        "resize_size": cfg.resize_size,
        "interpolation": interpolation,
        "colour_constancy": {"method": cfg.colour_constancy, "power": 6.0},
        "mean": mean.flatten().tolist(),
        "std": std.flatten().tolist(),
        "temperature": temperature,
        "malignant_classes": sorted(MALIGNANT),
        "referral": {
            "malignancy_threshold": threshold,
            "target_malignant_sensitivity": cfg.referral_sensitivity,
            "score": "sum of the malignant classes' calibrated probabilities",
            "operating_points": points,
            "chosen_on": f"{dataset.name} validation split ({len(va)} images, {int(y_malignant.sum())} malignant)",
            "uncertain_below": 0.5,
        },
        "training_data": {
            "dataset": dataset.name, "format": dataset.format, "n_images": len(dataset.samples),
            "split_file": "splits.csv", "split": "lesion-grouped, stratified by diagnosis",
            "split_fractions": {"val": cfg.val_fraction, "test": cfg.test_fraction},
            "seed": cfg.seed,
            "counts": {
                dataset.name: {sp: int((splits[:n_main] == sp).sum()) for sp in ("train", "val", "test")},
                **{name: {"train": n} for name, n in prep.extra_counts.items()},
            },
            "licence": "CC BY-NC-SA 4.0" if dataset.format == "ham10000" else "see dataset",
            "extra_training_sets": [Path(p).name for p in cfg.extra_train],
            "extra_validation_sets": [Path(p).name for p in cfg.extra_val],
            "held_out_sets": [Path(p).name for p in cfg.holdout],
        },
        "training": {
            "best_epoch": best["epoch"], "best_weights": best.get("weights", "raw"), "epochs": cfg.epochs,
            "selection": "mean of main validation balanced accuracy and each extra validation set's melanoma AUC",
            "config": asdict(cfg), "history": history,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "device": str(device),
        },
        "metrics": {
            "validation": {
                k: after[k] for k in ("balanced_accuracy", "accuracy", "macro_auc", "malignant_auc")
            }
            | {"melanoma_auc": after["melanoma"]["auc"], "ece_before_calibration": before["ece"],
               "ece": after["ece"]}
            | {f"melanoma_auc[{k}]": v for k, v in extra_auc.items()},
        },
        "created_at": created.isoformat(),
    }
    bundle = save_bundle(model.cpu(), run / "bundle", meta)
    shutil.copy(run / "splits.csv", bundle.path / "splits.csv")
    log.info("bundle %s written to %s (val balanced accuracy %.4f, T=%.3f, referral threshold %.3f)",
             version, bundle.path, after["balanced_accuracy"], temperature, threshold)
    return bundle.path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `skinscan train` options to a parser."""
    d = TrainConfig(data="", out="")
    parser.add_argument("--data", required=True, help="dataset folder or ground-truth CSV")
    parser.add_argument("--out", required=True,
                        help="run folder (arguments, splits, logs, checkpoints, bundle)")
    parser.add_argument("--arch", default=d.arch,
                        help="timm (tf_efficientnet_lite0/1/2) or torchvision architecture name")
    parser.add_argument("--input-size", type=int, default=d.input_size)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--pretrained", default=d.pretrained,
                        help="'imagenet' (installed package weights, no download), 'none', a torchvision weights "
                             "name (downloads) or a local .pth file")
    parser.add_argument("--colour-constancy", default=d.colour_constancy, choices=COLOUR_METHODS,
                        help="colour correction applied in training and serving alike")
    parser.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale,
                        help="pretrained backbone learning rate as a fraction of the head's")
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay, help="weight EMA decay per step (0: off)")
    parser.add_argument("--extra-weight", type=float, default=d.extra_weight,
                        help="sampling weight of extra training images relative to main ones")
    parser.add_argument("--referral-sensitivity", type=float, default=d.referral_sensitivity,
                        help="malignant sensitivity the default referral flag keeps on validation")
    parser.add_argument("--resize-size", type=int, default=0,
                        help="shorter side before the centre crop (0: the input size)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--limit", type=int, default=0, help="use at most this many images (smoke tests)")
    parser.add_argument("--splits", default=None, help="reuse this split CSV instead of making one")
    parser.add_argument("--version", default=None, help="version string for the bundle")
    parser.add_argument("--extra-train", action="append", default=[], metavar="DATA",
                        help="another dataset whose every image joins the training split (repeatable)")
    parser.add_argument("--holdout", action="append", default=[], metavar="DATA",
                        help="a held-out set: extra images that duplicate one of its images are dropped "
                             "(repeatable)")
    parser.add_argument("--extra-val", action="append", default=[], metavar="DATA",
                        help="another clinic's set whose melanoma AUC joins model choice (never trained on)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's last checkpoint")


def run_from_args(args: argparse.Namespace) -> Path:
    """Run `skinscan train` from parsed arguments."""
    cfg = TrainConfig(
        data=args.data, out=args.out, arch=args.arch, input_size=args.input_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        pretrained=None if args.pretrained in (None, "none") else args.pretrained, device=args.device,
        threads=args.threads, limit=args.limit,
        splits=args.splits, version=args.version, extra_train=args.extra_train, holdout=args.holdout,
        extra_val=args.extra_val, colour_constancy=args.colour_constancy, backbone_lr_scale=args.backbone_lr_scale,
        ema_decay=args.ema_decay, extra_weight=args.extra_weight, referral_sensitivity=args.referral_sensitivity,
        resize_size=args.resize_size,
    )
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return train(cfg, resume=args.resume)
