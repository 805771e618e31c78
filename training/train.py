"""`skinscan train`: fine-tune a classifier with class-balanced sampling, partial labels, EMA and per-epoch
checkpoints, choose it on validation, calibrate it, and write the bundle (laid out as torchvision's references)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import shutil
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from torchvision.transforms import v2
from tqdm import tqdm

from skinscan.labels import CLASSES, MALIGNANT
from training.bundle import create_model, save_bundle
from training.calibration import fit_temperature, operating_points, referral_threshold, softmax
from training.config import RESUMABLE, TrainConfig, add_arguments, config_from_args
from training.metrics import classification_report
from training.partial_labels import partial_label_loss
from training.rundata import RunData, load_run_data

__all__ = ["TrainConfig", "add_arguments", "run_from_args", "train"]

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


def train_transform(input_size: int) -> v2.Compose:
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


def warmup_cosine(warmup_steps: float, total_steps: float) -> Any:
    """Return the LambdaLR factor of a linear warm-up followed by cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


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


def selection_score(report: dict[str, Any], extra: dict[str, float | None]) -> float:
    """Model choice: main validation balanced accuracy, averaged with each other clinic's melanoma AUC."""
    figures = [report["balanced_accuracy"]] + [v for v in extra.values() if v is not None]
    return float(np.mean(figures))


class Trainer:
    """One run: the network, its EMA, optimiser, schedule and history, trained epoch by epoch."""

    def __init__(self, cfg: TrainConfig, run: Path, data: RunData, device: torch.device) -> None:
        self.cfg, self.run, self.data, self.device = cfg, run, data, device
        self.model = create_model(cfg.arch, len(CLASSES), cfg.pretrained).to(device,
                                                                             memory_format=torch.channels_last)
        self.ema = (torch.optim.swa_utils.AveragedModel(
            self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
            if cfg.ema_decay > 0 else None)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = max(1, len(data.train_idx) // cfg.batch_size)
        self.schedule = warmup_cosine(cfg.warmup_epochs * self.steps_per_epoch, cfg.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.amp = amp_dtype(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.augment = train_transform(cfg.input_size)
        self.loss_weights = torch.tensor(data.loss_weights, dtype=torch.float32, device=device)
        self.masks = torch.from_numpy(data.masks)
        self.start_epoch, self.best_score = 0, -1.0
        self.history: list[dict[str, Any]] = []

    @property
    def checkpoint_path(self) -> Path:
        """The last epoch's full training state."""
        return self.run / "checkpoints" / "last.pt"

    def resume(self) -> None:
        """Continue from the run's last checkpoint, if there is one."""
        if not self.checkpoint_path.exists():
            return
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best_score, self.history = state["epoch"] + 1, state["best_score"], state["history"]
        # The schedule follows the (possibly changed) number of epochs from the step reached.
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr * group.get("lr_scale", 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self.schedule, last_epoch=self.start_epoch * self.steps_per_epoch - 1)
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        log.info("resumed from epoch %d (best selection score %.4f)", self.start_epoch, self.best_score)

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch of class-balanced batches; return its loss and speed."""
        cfg, data, device = self.cfg, self.data, self.device
        self.model.train()
        t0 = time.time()
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        order = rng.choice(data.train_idx, size=self.steps_per_epoch * cfg.batch_size, replace=True,
                           p=data.sample_p)
        total_loss = 0.0
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   mininterval=5)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            raw = torch.from_numpy(data.prepared.images[idx]).permute(0, 3, 1, 2)
            x = torch.stack([self.augment(img) for img in raw])
            x = x.pin_memory() if device.type == "cuda" else x
            x = _normalize(x, data.mean, data.std).to(device, non_blocking=True)
            y = torch.from_numpy(data.labels[idx]).to(device, non_blocking=True)
            mask = self.masks[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.model(x)
            loss = partial_label_loss(logits, mask, self.loss_weights[y], cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            total_loss += loss.item()
            bar.set_postfix(loss=f"{total_loss / (step + 1):.3f}")
        seconds = time.time() - t0
        return {"epoch": epoch + 1, "train_loss": total_loss / self.steps_per_epoch, "seconds": seconds,
                "images_per_second": self.steps_per_epoch * cfg.batch_size / seconds}

    def evaluate(self, net: torch.nn.Module) -> tuple[dict[str, Any], dict[str, float | None], float]:
        """Validation report, each extra validation set's melanoma AUC, and the selection score of a network."""
        data = self.data
        logits = predict_logits(net, data.val_images, data.mean, data.std, self.device)
        report = classification_report(data.labels[data.val_idx], softmax(logits))
        extra: dict[str, float | None] = {}
        mel = CLASSES.index("mel")
        for ev in data.extra_val:
            probs = softmax(predict_logits(net, ev.images, data.mean, data.std, self.device))
            extra[ev.name] = (float(roc_auc_score(ev.melanoma, probs[:, mel]))
                              if 0 < ev.melanoma.sum() < len(ev.melanoma) else None)
        return report, extra, selection_score(report, extra)

    def validate_epoch(self, entry: dict[str, Any]) -> None:
        """Validate the raw and the EMA weights, add their figures to entry, and keep the best as best.pt."""
        candidates = [("raw", self.model)] + ([("ema", self.ema.module)] if self.ema is not None else [])
        for name, net in candidates:
            report, extra, score = self.evaluate(net)
            prefix = "val" if name == "raw" else "ema_val"
            entry |= {
                f"{prefix}_balanced_accuracy": report["balanced_accuracy"], f"{prefix}_accuracy": report["accuracy"],
                f"{prefix}_macro_auc": report["macro_auc"], f"{prefix}_melanoma_auc": report["melanoma"]["auc"],
                f"{prefix}_score": score,
            } | {f"{prefix}_melanoma_auc[{k}]": v for k, v in extra.items()}
            if score > self.best_score:
                self.best_score = score
                torch.save({"model": net.state_dict(), "epoch": entry["epoch"], "weights": name, "score": score},
                           self.run / "checkpoints" / "best.pt")

    def save_checkpoint(self, epoch: int) -> None:
        """Write the full training state atomically, so a killed run resumes from this epoch."""
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({
            "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": epoch, "best_score": self.best_score,
            "history": self.history, "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
        }, tmp)
        tmp.replace(self.checkpoint_path)

    def fit(self) -> None:
        """Train the remaining epochs, validating and checkpointing after each."""
        for epoch in range(self.start_epoch, self.cfg.epochs):
            entry = self.train_one_epoch(epoch)
            self.validate_epoch(entry)
            self.history.append(entry)
            log.info("epoch %s", json.dumps(entry))
            with (self.run / "history.jsonl").open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
            self.save_checkpoint(epoch)

    def finalize(self) -> Path:
        """Load the chosen weights, calibrate, pick referral operating points, and write the bundle."""
        cfg, data, device = self.cfg, self.data, self.device
        best = torch.load(self.run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
        model = self.model
        model.load_state_dict(best["model"])
        model.to(device)
        y_val = data.labels[data.val_idx]
        logits = predict_logits(model, data.val_images, data.mean, data.std, device)
        temperature = fit_temperature(logits, y_val)
        before = classification_report(y_val, softmax(logits))
        after = classification_report(y_val, softmax(logits, temperature))
        probs = softmax(logits, temperature)
        malignant = [CLASSES.index(c) for c in sorted(MALIGNANT)]
        y_malignant = np.isin(y_val, malignant).astype(int)
        score = probs[:, malignant].sum(1)
        threshold = referral_threshold(y_malignant, score, cfg.referral_sensitivity)
        _, extra_auc, _ = self.evaluate(model)
        meta = bundle_metadata(self, best, temperature, threshold, operating_points(y_malignant, score),
                               before, after, extra_auc, int(y_malignant.sum()))
        bundle = save_bundle(model.cpu(), self.run / "bundle", meta)
        shutil.copy(self.run / "splits.csv", bundle.path / "splits.csv")
        log.info("bundle %s written to %s (val balanced accuracy %.4f, T=%.3f, referral threshold %.3f)",
                 meta["version"], bundle.path, after["balanced_accuracy"], temperature, threshold)
        return bundle.path


def bundle_metadata(
    trainer: Trainer, best: dict[str, Any], temperature: float, threshold: float, points: list[dict[str, float]],
    before: dict[str, Any], after: dict[str, Any], extra_auc: dict[str, float | None], n_malignant: int,
) -> dict[str, Any]:
    """The bundle's metadata.json content: preprocessing, calibration, referral, data, training and validation."""
    cfg, data = trainer.cfg, trainer.data
    dataset, prep = data.dataset, data.prepared
    created = datetime.now(UTC)
    splits = np.array(prep.splits)
    return {
        "name": f"skinscan-{dataset.format}-{cfg.arch}",
        "version": cfg.version or f"{created:%Y%m%d}-{cfg.arch}-{cfg.input_size}px-s{cfg.seed}",
        "architecture": cfg.arch,
        "initialisation": "ImageNet (installed package weights)" if cfg.pretrained == "imagenet"
        else (f"warm start from {Path(cfg.pretrained).name}" if cfg.pretrained else "random"),
        "input_size": cfg.input_size,
        "resize_size": cfg.resize_size,
        "interpolation": data.interpolation,
        "colour_constancy": {"method": cfg.colour_constancy, "power": 6.0},
        "mean": data.mean.flatten().tolist(),
        "std": data.std.flatten().tolist(),
        "temperature": temperature,
        "malignant_classes": sorted(MALIGNANT),
        "referral": {
            "malignancy_threshold": threshold,
            "target_malignant_sensitivity": cfg.referral_sensitivity,
            "score": "sum of the malignant classes' calibrated probabilities",
            "operating_points": points,
            "chosen_on": f"{dataset.name} validation split ({len(data.val_idx)} images, {n_malignant} malignant)",
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
            "selection": "mean of main validation balanced accuracy and each extra validation set's melanoma AUC",
            "config": asdict(cfg), "history": trainer.history,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "device": str(trainer.device),
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


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train a model as configured, checkpointing every epoch, and write the calibrated bundle; return it."""
    run = Path(cfg.out)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    args_file = run / "args.json"
    if resume and args_file.exists():
        saved = json.loads(args_file.read_text())
        # The run folder is where it is now, even if it was moved or copied since; a few settings may change.
        saved.update({k: getattr(cfg, k) for k in RESUMABLE if k != "version" or cfg.version})
        cfg = TrainConfig(**saved)
    args_file.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    trainer = Trainer(cfg, run, load_run_data(cfg, run), device)
    if resume:
        trainer.resume()
    trainer.fit()
    return trainer.finalize()


def run_from_args(args: argparse.Namespace) -> Path:
    """Run `skinscan train` from parsed arguments, logging to the run folder's train.log."""
    cfg = config_from_args(args)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return train(cfg, resume=args.resume)
