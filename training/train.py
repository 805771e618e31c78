"""`skinscan train`: fine-tune a classifier with class-balanced sampling, partial labels, EMA and per-epoch
checkpoints, choose it on validation, calibrate it, and write the bundle.

Laid out as torchvision's classification references: `train_one_epoch` and `evaluate` are called epoch by epoch
from `train` (their `main`), and `get_args_parser` builds the one parser, an option per `TrainConfig` field.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torchvision.transforms import v2
from tqdm import tqdm

from skinscan.labels import CLASSES, MALIGNANT
from skinscan.model.metrics import classification_report
from training.calibration import (
    fit_logit_offsets,
    fit_temperature,
    operating_points,
    referral_threshold,
    softmax,
)
from training.config import RESUMABLE, TrainConfig, add_arguments, config_from_args
from training.export import create_model, round_to_float16, save_bundle
from training.partial_labels import partial_label_loss
from training.perturb import RandomAppearance
from training.rundata import RunData, load_run_data

__all__ = ["TrainConfig", "add_arguments", "evaluate", "get_args_parser", "run_from_args", "train",
           "train_one_epoch"]

log = logging.getLogger(__name__)


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


class _Rotate90:
    """Rotate by a random multiple of 90 degrees (lossless, no corners to fill)."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return torch.rot90(img, int(torch.randint(4, ()).item()), dims=(-2, -1))


def train_transform(input_size: int, aspect_range: float = 1.7) -> v2.Compose:
    """Dermoscopy geometry augmentation: lesions have no up or left, so flips and 90-degree rotations (a small
    free rotation besides); random resized crops that squash and stretch up to aspect_range either way (square
    and 4:3 archives must look alike) and some zoom-out (other collections frame lesions smaller, with dark
    dermoscope corners); a little contrast, saturation, hue and blur. White balance, exposure, rims, resolution
    and compression come from `training.perturb.RandomAppearance`, applied after this."""
    return v2.Compose([
        v2.RandomApply([v2.RandomZoomOut(fill=0, side_range=(1.0, 1.5))], p=0.2),
        v2.RandomResizedCrop(input_size, scale=(0.35, 1.0), ratio=(1.0 / aspect_range, aspect_range),
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        _Rotate90(),
        v2.RandomApply([v2.RandomRotation(20)], p=0.25),
        v2.ColorJitter(contrast=0.25, saturation=0.3, hue=0.03),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.2))], p=0.15),
    ])


class Augment:
    """Geometry (torchvision v2) then appearance (`RandomAppearance`) on a 3 x S x S uint8 tensor."""

    def __init__(self, input_size: int, aspect_range: float, seed: int) -> None:
        self.geometry = train_transform(input_size, aspect_range)
        self.appearance = RandomAppearance(np.random.default_rng(seed))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        rgb = self.appearance(np.ascontiguousarray(self.geometry(img).permute(1, 2, 0).numpy()))
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def _normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((batch.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, fp16 on older GPUs, none on CPU (bf16 autocast is slow there)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
    batch_size: int = 128, tta: bool = False,
) -> np.ndarray:
    """Return logits for N x S x S x 3 uint8 images already centre-cropped to the input size."""
    model.eval()
    outs = []
    amp = amp_dtype(device)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        x = _normalize(x.to(device, non_blocking=True), mean.to(device), std.to(device))
        views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)] if tta else [x]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = torch.stack([model(v).float() for v in views]).mean(0)
        outs.append(logits.cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, len(CLASSES)), dtype=np.float32)


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LRScheduler:
    """Per optimiser step: linear warm-up from lr / warmup_steps to lr over warmup_steps steps, then cosine decay
    to zero at total_steps (torch's LinearLR then CosineAnnealingLR, as torchvision's references chain them)."""
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=0.0)
    if warmup_steps <= 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1))
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Head at the full learning rate, a pretrained backbone at lr * backbone_lr_scale; no decay on norms/biases."""
    head_names = {n for n, _ in model.named_parameters() if n.split(".")[0] in ("fc", "classifier", "head")}
    scale = cfg.backbone_lr_scale if cfg.pretrained else 1.0
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault((name in head_names, param.ndim <= 1), []).append(param)
    return [
        {"params": params, "lr": cfg.lr * (1.0 if is_head else scale), "lr_scale": 1.0 if is_head else scale,
         "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        for (is_head, no_decay), params in groups.items()
    ]


def selection_score(report: dict[str, Any], variant_ba: dict[str, float]) -> float:
    """Model choice: balanced accuracy on the validation split, averaged with its balanced accuracy under every
    robustness variant (how other clinics' copies of the same images differ), so a model that holds wins."""
    return float(np.mean([report["balanced_accuracy"], *variant_ba.values()]))


@dataclass
class TrainState:
    """What training changes step by step: the network, its EMA, optimiser, schedule, scaler and history."""

    model: torch.nn.Module
    ema: torch.optim.swa_utils.AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    start_epoch: int = 0
    best_score: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, start_step: int = 0
) -> LRScheduler:
    """The run's schedule from each group's configured peak rate (lr * lr_scale), already at start_step: a resumed
    run follows its (possibly changed) number of epochs from the step it reached."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = cfg.lr * group.get("lr_scale", 1.0)
    scheduler = warmup_cosine_scheduler(optimizer, round(cfg.warmup_epochs * steps_per_epoch),
                                        cfg.epochs * steps_per_epoch)
    with warnings.catch_warnings():  # replaying steps: no optimiser step is due, so torch's warning is moot
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(start_step):
            scheduler.step()
    return scheduler


def create_state(cfg: TrainConfig, data: RunData, device: torch.device) -> TrainState:
    """Build the network (channels-last on the device), its EMA, AdamW, the schedule and the AMP gradient scaler."""
    model = create_model(cfg.arch, len(CLASSES), cfg.pretrained).to(device, memory_format=torch.channels_last)
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay > 0 else None)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, len(data.train_idx) // cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)
    return TrainState(model, ema, optimizer, scheduler, scaler, steps)


def load_checkpoint(state: TrainState, cfg: TrainConfig, path: Path) -> None:
    """Continue from a run's last checkpoint: weights, EMA, optimiser, scaler, history and random state."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state.model.load_state_dict(saved["model"])
    if state.ema is not None and saved.get("ema") is not None:
        state.ema.load_state_dict(saved["ema"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scaler.load_state_dict(saved["scaler"])
    state.start_epoch, state.best_score, state.history = saved["epoch"] + 1, saved["best_score"], saved["history"]
    state.scheduler = make_scheduler(state.optimizer, cfg, state.steps_per_epoch,
                                     state.start_epoch * state.steps_per_epoch)
    torch.set_rng_state(saved["torch_rng"])
    np.random.set_state(saved["numpy_rng"])
    log.info("resumed from epoch %d (best selection score %.4f)", state.start_epoch, state.best_score)


def save_checkpoint(state: TrainState, path: Path, epoch: int) -> None:
    """Write the full training state atomically, so a killed run resumes from this epoch."""
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": state.model.state_dict(), "ema": state.ema.state_dict() if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(), "scaler": state.scaler.state_dict(),
        "scheduler": state.scheduler.state_dict(), "epoch": epoch, "best_score": state.best_score,
        "history": state.history, "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
    }, tmp)
    tmp.replace(path)


def train_one_epoch(
    state: TrainState, data: RunData, cfg: TrainConfig, epoch: int, device: torch.device
) -> dict[str, Any]:
    """Train one epoch of class-balanced, augmented batches (autocast and the gradient scaler on a GPU), stepping
    the schedule and the EMA per batch; return the epoch's loss and speed."""
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    steps = state.steps_per_epoch
    amp = amp_dtype(device)
    augment = Augment(cfg.input_size, cfg.aspect_range, cfg.seed * 1000 + epoch)
    loss_weights = torch.tensor(data.loss_weights, dtype=torch.float32, device=device)
    masks = torch.from_numpy(data.masks)
    model.train()
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed * 1000 + epoch)
    order = rng.choice(data.train_idx, size=steps * cfg.batch_size, replace=True, p=data.sample_p)
    total_loss = 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", mininterval=5)
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        raw = torch.from_numpy(data.prepared.images[idx]).permute(0, 3, 1, 2)
        x = torch.stack([augment(img) for img in raw])
        x = x.pin_memory() if device.type == "cuda" else x
        x = _normalize(x, data.mean, data.std).to(device, non_blocking=True)
        y = torch.from_numpy(data.labels[idx]).to(device, non_blocking=True)
        mask = masks[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        loss = partial_label_loss(logits, mask, loss_weights[y], cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(model)
        total_loss += loss.item()
        bar.set_postfix(loss=f"{total_loss / (step + 1):.3f}")
    seconds = time.time() - t0
    return {"epoch": epoch + 1, "train_loss": total_loss / steps, "seconds": seconds,
            "images_per_second": steps * cfg.batch_size / seconds}


@dataclass
class Evaluation:
    """A network's validation report, its balanced accuracy per robustness variant, each extra validation set's
    melanoma AUC, and its selection score."""

    report: dict[str, Any]
    variant_ba: dict[str, float]
    extra_auc: dict[str, float | None]
    score: float


def variant_balanced_accuracy(net: torch.nn.Module, data: RunData, device: torch.device) -> dict[str, float]:
    """Balanced accuracy of a network on each robustness variant of the validation subset."""
    y = data.labels[data.val_idx[data.val_variant_pos]]
    out = {}
    for name, images in data.val_variants.items():
        probs = softmax(predict_logits(net, images, data.mean, data.std, device))
        out[name] = classification_report(y, probs)["balanced_accuracy"]
    return out


def extra_melanoma_auc(net: torch.nn.Module, data: RunData, device: torch.device) -> dict[str, float | None]:
    """Melanoma AUC of a network on each extra validation set (None where a set has one class only)."""
    extra: dict[str, float | None] = {}
    mel = CLASSES.index("mel")
    for ev in data.extra_val:
        probs = softmax(predict_logits(net, ev.images, data.mean, data.std, device))
        extra[ev.name] = (float(roc_auc_score(ev.melanoma, probs[:, mel]))
                          if 0 < ev.melanoma.sum() < len(ev.melanoma) else None)
    return extra


def evaluate(net: torch.nn.Module, data: RunData, device: torch.device) -> Evaluation:
    """Score a network on the validation split, its robustness variants and each extra validation set."""
    logits = predict_logits(net, data.val_images, data.mean, data.std, device)
    report = classification_report(data.labels[data.val_idx], softmax(logits))
    variant_ba = variant_balanced_accuracy(net, data, device)
    return Evaluation(report, variant_ba, extra_melanoma_auc(net, data, device), selection_score(report, variant_ba))


def validate(state: TrainState, data: RunData, device: torch.device, entry: dict[str, Any], best_path: Path) -> None:
    """Evaluate the raw and the EMA weights, add their figures to entry, and keep the best so far at best_path."""
    candidates = [("raw", state.model)] + ([("ema", state.ema.module)] if state.ema is not None else [])
    for name, net in candidates:
        ev = evaluate(net, data, device)
        prefix = "val" if name == "raw" else "ema_val"
        entry |= {
            f"{prefix}_balanced_accuracy": ev.report["balanced_accuracy"], f"{prefix}_accuracy": ev.report["accuracy"],
            f"{prefix}_macro_auc": ev.report["macro_auc"], f"{prefix}_melanoma_auc": ev.report["melanoma"]["auc"],
            f"{prefix}_score": ev.score,
        } | {f"{prefix}_melanoma_auc[{k}]": v for k, v in ev.extra_auc.items()} | {
            f"{prefix}_balanced_accuracy[{k}]": v for k, v in ev.variant_ba.items()}
        if ev.score > state.best_score:
            state.best_score = ev.score
            torch.save({"model": net.state_dict(), "epoch": entry["epoch"], "weights": name, "score": ev.score},
                       best_path)


@dataclass
class Calibration:
    """What the chosen network's validation logits fix: temperature, decision offsets, referral threshold and
    operating points, the reports before and after temperature scaling (plain arg-max) and with the offsets,
    balanced accuracy per robustness variant, and the extra validation sets' melanoma AUCs."""

    temperature: float
    offsets: np.ndarray
    threshold: float
    points: list[dict[str, float | None]]
    before: dict[str, Any]
    after: dict[str, Any]
    corrected: dict[str, Any]
    variant_ba: dict[str, dict[str, float]]
    extra_auc: dict[str, float | None]
    n_malignant: int


def calibrate(model: torch.nn.Module, data: RunData, cfg: TrainConfig, device: torch.device) -> Calibration:
    """Fit the temperature on validation, the decision offsets on validation and its robustness variants (for
    balanced accuracy), and choose the referral threshold at the configured sensitivity."""
    y_val = data.labels[data.val_idx]
    logits = predict_logits(model, data.val_images, data.mean, data.std, device)
    temperature = fit_temperature(logits, y_val)
    probs = softmax(logits, temperature)
    y_sub = y_val[data.val_variant_pos]
    variant_probs = {name: softmax(predict_logits(model, images, data.mean, data.std, device), temperature)
                     for name, images in data.val_variants.items()}
    offsets = fit_logit_offsets(np.concatenate([probs, *variant_probs.values()]),
                                np.concatenate([y_val] + [y_sub] * len(variant_probs)))
    variant_ba = {
        name: {"plain": classification_report(y_sub, p)["balanced_accuracy"],
               "corrected": classification_report(y_sub, p, logit_offsets=offsets)["balanced_accuracy"]}
        for name, p in variant_probs.items()
    }
    malignant = [CLASSES.index(c) for c in sorted(MALIGNANT)]
    y_malignant = np.isin(y_val, malignant).astype(int)
    score = probs[:, malignant].sum(1)
    return Calibration(
        temperature=temperature, offsets=offsets,
        threshold=referral_threshold(y_malignant, score, cfg.referral_sensitivity),
        points=operating_points(y_malignant, score), before=classification_report(y_val, softmax(logits)),
        after=classification_report(y_val, probs),
        corrected=classification_report(y_val, probs, logit_offsets=offsets), variant_ba=variant_ba,
        extra_auc=extra_melanoma_auc(model, data, device), n_malignant=int(y_malignant.sum()),
    )


def bundle_metadata(
    cfg: TrainConfig, data: RunData, best: dict[str, Any], cal: Calibration, history: list[dict[str, Any]],
    device: torch.device,
) -> dict[str, Any]:
    """The bundle's metadata.json content: preprocessing, calibration, referral, data, training and validation."""
    dataset, prep = data.dataset, data.prepared
    created = datetime.now(UTC)
    splits = np.array(prep.splits)
    after = cal.after
    return {
        "name": f"skinscan-{dataset.format}-{cfg.arch}",
        "version": cfg.version or f"{created:%Y%m%d}-{cfg.arch}-{cfg.input_size}px-s{cfg.seed}",
        "architecture": cfg.arch,
        "initialisation": "ImageNet (installed package weights)" if cfg.pretrained == "imagenet"
        else (f"warm start from {Path(cfg.pretrained).name}" if cfg.pretrained else "random"),
        "input_size": cfg.input_size,
        "resize_size": cfg.resize_size,
        "resize_mode": cfg.resize_mode,
        "interpolation": data.interpolation,
        "colour_constancy": {"method": cfg.colour_constancy, "power": 6.0},
        "mean": data.mean.flatten().tolist(),
        "std": data.std.flatten().tolist(),
        "temperature": cal.temperature,
        "decision": {
            "rule": "arg-max of log calibrated probability plus a per-class offset (class-prior correction)",
            "logit_offsets": [round(float(v), 4) for v in cal.offsets],
            "fitted_on": f"{dataset.name} validation split and its robustness variants, for balanced accuracy",
        },
        "malignant_classes": sorted(MALIGNANT),
        "referral": {
            "malignancy_threshold": cal.threshold,
            "target_malignant_sensitivity": cfg.referral_sensitivity,
            "score": "sum of the malignant classes' calibrated probabilities",
            "operating_points": cal.points,
            "chosen_on": f"{dataset.name} validation split ({len(data.val_idx)} images, {cal.n_malignant} malignant)",
            "uncertain_below": 0.5,
        },
        "training_data": {
            "dataset": dataset.name, "format": dataset.format, "n_images": len(dataset.samples),
            "split_file": "splits.csv", "split": "lesion-grouped, stratified by diagnosis",
            "split_fractions": {"val": cfg.val_fraction, "test": cfg.test_fraction},
            "seed": cfg.seed,
            "counts": {
                dataset.name: {sp: int((splits[: prep.n_main] == sp).sum()) for sp in ("train", "val", "test")},
                **{name: {"train": n} for name, n in prep.extra_counts.items()},
            },
            "licence": "CC BY-NC-SA 4.0" if dataset.format == "ham10000" else "see dataset",
            "extra_training_sets": [Path(p).name for p in cfg.extra_train],
            "extra_validation_sets": [Path(p).name for p in cfg.extra_val],
            "held_out_sets": [Path(p).name for p in cfg.holdout],
        },
        "training": {
            "best_epoch": best["epoch"], "best_weights": best.get("weights", "raw"), "epochs": cfg.epochs,
            "selection": "mean balanced accuracy over the validation split and its robustness variants",
            "class_prior": [round(float(v), 4) for v in data.prior],
            "config": asdict(cfg), "history": history,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "device": str(device),
        },
        "metrics": {
            "validation": {
                k: after[k] for k in ("balanced_accuracy", "accuracy", "macro_auc", "malignant_auc")
            }
            | {"melanoma_auc": after["melanoma"]["auc"], "ece_before_calibration": cal.before["ece"],
               "ece": after["ece"], "balanced_accuracy_corrected": cal.corrected["balanced_accuracy"],
               "variants_balanced_accuracy": cal.variant_ba}
            | {f"melanoma_auc[{k}]": v for k, v in cal.extra_auc.items()},
        },
        "created_at": created.isoformat(),
    }


def write_bundle(state: TrainState, data: RunData, cfg: TrainConfig, run: Path, device: torch.device) -> Path:
    """Load the chosen weights, calibrate them, and write the bundle (with the run's splits.csv); return it."""
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    model = state.model
    model.load_state_dict(best["model"])
    round_to_float16(model.float())  # the bundle ships float16 weights: calibrate and measure those
    model.to(device)
    cal = calibrate(model, data, cfg, device)
    meta = bundle_metadata(cfg, data, best, cal, state.history, device)
    bundle = save_bundle(model.cpu(), run / "bundle", meta)
    shutil.copy(run / "splits.csv", bundle.path / "splits.csv")
    log.info("bundle %s written to %s (val balanced accuracy %.4f, T=%.3f, referral threshold %.3f)",
             meta["version"], bundle.path, cal.after["balanced_accuracy"], cal.temperature, cal.threshold)
    return bundle.path


def _run_config(cfg: TrainConfig, run: Path, resume: bool) -> TrainConfig:
    """The configuration to run: a resumed run's args.json, with the few settings a resume may change."""
    args_file = run / "args.json"
    if resume and args_file.exists():
        saved = json.loads(args_file.read_text())
        # The run folder is where it is now, even if it was moved or copied since; a few settings may change.
        saved.update({k: getattr(cfg, k) for k in RESUMABLE if k != "version" or cfg.version})
        cfg = TrainConfig(**saved)
    args_file.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return cfg


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train a model as configured, validating and checkpointing every epoch, and write the calibrated bundle."""
    run = Path(cfg.out)
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    cfg = _run_config(cfg, run, resume)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    data = load_run_data(cfg, run)
    state = create_state(cfg, data, device)
    if resume and (checkpoints / "last.pt").exists():
        load_checkpoint(state, cfg, checkpoints / "last.pt")
    for epoch in range(state.start_epoch, cfg.epochs):
        entry = train_one_epoch(state, data, cfg, epoch, device)
        validate(state, data, device, entry, checkpoints / "best.pt")
        state.history.append(entry)
        log.info("epoch %s", json.dumps(entry))
        with (run / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        save_checkpoint(state, checkpoints / "last.pt", epoch)
    return write_bundle(state, data, cfg, run, device)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training parser: one option per TrainConfig field, and --resume."""
    parser = argparse.ArgumentParser(description="Fine-tune a skin-lesion classifier and write its bundle.",
                                     add_help=add_help)
    add_arguments(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> Path:
    """Run `skinscan train` from parsed arguments, logging to the run folder's train.log."""
    cfg = config_from_args(args)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_from_args(get_args_parser().parse_args())
