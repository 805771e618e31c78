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
from torchvision.transforms import v2
from tqdm import tqdm

from skinscan.imaging import decode_rgb
from skinscan.labels import CLASSES
from training.bundle import create_model, save_bundle
from training.calibration import fit_temperature, referral_threshold, softmax
from training.datasets import Dataset, Sample, read_dataset
from training.metrics import classification_report
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
    arch: str = "regnet_y_400mf"
    input_size: int = 128
    resize_size: int = 0  # 0: input_size / 0.875
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.05
    warmup_epochs: float = 1.0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    pretrained: str | None = None
    device: str = "auto"
    threads: int = 0
    limit: int = 0  # use at most this many images (for smoke tests)
    splits: str | None = None  # reuse an existing split CSV
    referral_sensitivity: float = 0.95
    version: str | None = None
    # Other collections whose every image joins the training split (e.g. ISIC 2017's official training part),
    # and held-out sets whose images (and near-duplicates of them) must never be trained on.
    extra_train: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.resize_size:
            self.resize_size = int(round(self.input_size / 0.875))


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


def resize_crop(img: Image.Image, resize_size: int, crop: int) -> Image.Image:
    """Resize the shorter side to resize_size and centre-crop a square of side crop (as the bundle does)."""
    width, height = img.size
    scale = resize_size / min(width, height)
    new = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    img = img.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new[0] - crop) // 2, (new[1] - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def load_images(
    samples: list[Sample], resize_size: int, desc: str = "decoding"
) -> tuple[np.ndarray, list[int]]:
    """Decode every sample once to a uint8 N x S x S x 3 array (S = resize_size) and its difference hash."""
    out = np.empty((len(samples), resize_size, resize_size, 3), dtype=np.uint8)
    hashes = []
    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", mininterval=2)):
        img = decode_rgb(s.path.read_bytes(), draft_size=resize_size)
        hashes.append(dhash(img))
        out[i] = np.asarray(resize_crop(img, resize_size, resize_size))
    return out, hashes


def _augment(input_size: int) -> v2.Compose:
    """Dermoscopy augmentation: lesions have no up or left, so flips and any rotation; zoom in and out (other
    collections frame lesions smaller, with dark dermoscope corners); colour, as devices and lighting differ."""
    return v2.Compose([
        v2.RandomApply([v2.RandomZoomOut(fill=0, side_range=(1.0, 1.8))], p=0.3),
        v2.RandomResizedCrop(input_size, scale=(0.3, 1.0), ratio=(0.75, 1.33), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomApply([v2.RandomRotation(45)], p=0.5),
        v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.3, hue=0.05),
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


def _prepare(cfg: TrainConfig, run: Path) -> tuple[Dataset, np.ndarray, list[str]]:
    dataset = read_dataset(cfg.data)
    samples = dataset.samples
    if cfg.limit:
        rng = random.Random(cfg.seed)
        samples = rng.sample(samples, min(cfg.limit, len(samples)))
        dataset = Dataset(dataset.name, dataset.format, samples, dataset.known_labels)
    extra = [s for path in cfg.extra_train for s in read_dataset(path).samples]
    n_main = len(samples)
    images, hashes = load_images(samples + extra, cfg.resize_size)
    if extra:
        held_hashes, held_ids = _holdout_keys(cfg.holdout, cfg.resize_size)
        keep = [i for i, s in enumerate(extra)
                if hashes[n_main + i] not in held_hashes and s.image_id not in held_ids]
        log.info("extra training images: %d of %d kept (%d match a held-out image)",
                 len(keep), len(extra), len(extra) - len(keep))
        rows = np.concatenate([np.arange(n_main), n_main + np.array(keep, dtype=int)])
        images, hashes = images[rows], [hashes[i] for i in rows]
        extra = [extra[i] for i in keep]
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
    dataset = Dataset(dataset.name, dataset.format, every, dataset.known_labels)
    counts = {sp: sum(1 for x in splits if x == sp) for sp in ("train", "val", "test")}
    log.info("dataset %s (%s): %d images (%d extra), splits %s", dataset.name, dataset.format, len(every),
             len(extra), counts)
    return dataset, images, splits


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train a model as configured, checkpointing every epoch, and write the calibrated bundle; return it."""
    run = Path(cfg.out)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    args_file = run / "args.json"
    if resume and args_file.exists():
        saved = json.loads(args_file.read_text())
        # The run folder is where it is now, even if it was moved or copied since.
        saved.update({"out": cfg.out, "epochs": cfg.epochs, "device": cfg.device, "threads": cfg.threads})
        cfg = TrainConfig(**saved)
    args_file.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dataset, images, splits = _prepare(cfg, run)
    labels = np.array([CLASSES.index(s.label) for s in dataset.samples])
    tr = np.array([i for i, sp in enumerate(splits) if sp == "train"])
    va = np.array([i for i, sp in enumerate(splits) if sp == "val"])
    if len(tr) == 0 or len(va) == 0:
        raise ValueError("training and validation splits must both be non-empty")
    pixels = images[tr[:2000]].reshape(-1, 3)
    mean = torch.tensor(pixels.mean(0) / 255.0, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pixels.std(0) / 255.0, dtype=torch.float32).view(1, 3, 1, 1)
    val_images = np.ascontiguousarray(_center(images[va], cfg.input_size))

    model = create_model(cfg.arch, len(CLASSES), cfg.pretrained).to(device, memory_format=torch.channels_last)
    counts = np.bincount(labels[tr], minlength=len(CLASSES)).astype(np.float64)
    # Square-root rebalancing twice (in the sampler and in the loss) amounts to inverse-frequency weighting
    # without the extreme over-sampling of the rarest classes that plain inverse weights cause.
    class_w = 1.0 / np.sqrt(np.maximum(counts, 1))
    loss_w = torch.tensor(class_w / (class_w * counts).sum() * counts.sum(), dtype=torch.float32,
                          device=device)
    sample_w = class_w[labels[tr]]
    sample_p = sample_w / sample_w.sum()
    criterion = torch.nn.CrossEntropyLoss(weight=loss_w, label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    augment = _augment(cfg.input_size)
    steps_per_epoch = max(1, len(tr) // cfg.batch_size)

    start_epoch, best_score, history = 0, -1.0, []
    last = run / "checkpoints" / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, history = state["epoch"] + 1, state["best_score"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        log.info("resumed from epoch %d (best balanced accuracy %.4f)", start_epoch, best_score)

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
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(epoch * steps_per_epoch + step, cfg.epochs * steps_per_epoch,
                                     cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item()
            bar.set_postfix(loss=f"{total_loss / (step + 1):.3f}")
        logits = predict_logits(model, val_images, mean, std, device)
        report = classification_report(labels[va], softmax(logits))
        entry = {
            "epoch": epoch + 1, "train_loss": total_loss / steps_per_epoch,
            "val_balanced_accuracy": report["balanced_accuracy"], "val_accuracy": report["accuracy"],
            "val_macro_auc": report["macro_auc"], "val_melanoma_auc": report["melanoma"]["auc"],
            "seconds": time.time() - t0,
            "images_per_second": steps_per_epoch * cfg.batch_size / (time.time() - t0),
        }
        history.append(entry)
        log.info("epoch %s", json.dumps(entry))
        with (run / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        if report["balanced_accuracy"] > best_score:
            best_score = report["balanced_accuracy"]
            torch.save({"model": model.state_dict(), "epoch": epoch + 1}, run / "checkpoints" / "best.pt")
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best_score": best_score, "history": history,
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
        }, last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)

    return _finalize(cfg, run, model, dataset, labels, va, val_images, mean, std, device, history)


def _finalize(
    cfg: TrainConfig, run: Path, model: torch.nn.Module, dataset: Dataset, labels: np.ndarray, va: np.ndarray,
    val_images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
    history: list[dict[str, Any]],
) -> Path:
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(best["model"])
    model.to(device)
    logits = predict_logits(model, val_images, mean, std, device)
    temperature = fit_temperature(logits, labels[va])
    before = classification_report(labels[va], softmax(logits))
    after = classification_report(labels[va], softmax(logits, temperature))
    probs = softmax(logits, temperature)
    mel = CLASSES.index("mel")
    malignant = [CLASSES.index(c) for c in ("akiec", "bcc", "mel")]
    threshold = referral_threshold((labels[va] == mel).astype(int), probs[:, malignant].sum(1),
                                   cfg.referral_sensitivity)
    created = datetime.now(UTC)
    version = cfg.version or f"{created:%Y%m%d}-{cfg.arch}-{cfg.input_size}px-s{cfg.seed}"
    meta = {
        "name": f"skinscan-{dataset.format}-{cfg.arch}",
        "version": version,
        "architecture": cfg.arch,
        "input_size": cfg.input_size,
        "resize_size": cfg.resize_size,
        "interpolation": "bilinear",
        "mean": mean.flatten().tolist(),
        "std": std.flatten().tolist(),
        "temperature": temperature,
        "referral": {
            "malignancy_threshold": threshold,
            "target_melanoma_sensitivity": cfg.referral_sensitivity,
            "uncertain_below": 0.5,
        },
        "training_data": {
            "dataset": dataset.name, "format": dataset.format, "n_images": len(dataset.samples),
            "split_file": "splits.csv", "split": "lesion-grouped, stratified by diagnosis",
            "licence": "CC BY-NC-SA 4.0" if dataset.format == "ham10000" else "see dataset",
            "extra_training_sets": [Path(p).name for p in cfg.extra_train],
            "held_out_sets": [Path(p).name for p in cfg.holdout],
        },
        "training": {
            "best_epoch": best["epoch"], "epochs": cfg.epochs, "config": asdict(cfg), "history": history,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "device": str(device),
        },
        "metrics": {
            "validation": {
                k: after[k] for k in ("balanced_accuracy", "accuracy", "macro_auc", "malignant_auc")
            }
            | {"melanoma_auc": after["melanoma"]["auc"], "ece_before_calibration": before["ece"],
               "ece": after["ece"]},
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
    parser.add_argument("--arch", default=d.arch, help="torchvision architecture name")
    parser.add_argument("--input-size", type=int, default=d.input_size)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--pretrained", default=None,
                        help="torchvision weights name (e.g. IMAGENET1K_V2, downloads) or a local .pth file")
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
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's last checkpoint")


def run_from_args(args: argparse.Namespace) -> Path:
    """Run `skinscan train` from parsed arguments."""
    cfg = TrainConfig(
        data=args.data, out=args.out, arch=args.arch, input_size=args.input_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        pretrained=args.pretrained, device=args.device, threads=args.threads, limit=args.limit,
        splits=args.splits, version=args.version, extra_train=args.extra_train, holdout=args.holdout,
    )
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return train(cfg, resume=args.resume)
