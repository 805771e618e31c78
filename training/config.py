"""`skinscan train`'s configuration: one dataclass whose every field is a command-line option, saved per run."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from skinscan.model.colour import METHODS as COLOUR_METHODS


def _opt(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - argparse's word
    """A config field with its command-line help (and extra argparse keywords)."""
    if isinstance(default, list):
        return field(default_factory=list, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a run depends on; written to args.json so the run can be repeated or resumed."""

    data: str = field(metadata={"help": "dataset folder or ground-truth CSV (the main set, split by lesion)"})
    out: str = field(metadata={"help": "run folder (arguments, splits, logs, checkpoints, bundle)"})
    arch: str = _opt("tf_efficientnet_lite0", "timm (tf_efficientnet_lite0/1/2) or torchvision architecture name")
    input_size: int = _opt(160, "side of the square network input")
    resize_mode: str = _opt("squash", "squash: the whole image resized to the input square (a file and its copy "
                                      "squashed to square look alike); crop: shorter side to --resize-size, "
                                      "centre crop", choices=("squash", "crop"))
    resize_size: int = _opt(0, "crop mode: shorter side before the centre crop (0: the input size, so "
                               "HAM10000's 200x150 images keep their whole height)")
    aspect_range: float = _opt(1.7, "random squash and stretch of every training image, up to this aspect ratio "
                                    "either way (1: none)")
    epochs: int = _opt(8, "epochs (with --resume: the new total)")
    batch_size: int = _opt(32, "images per training step")
    lr: float = _opt(1e-3, "peak learning rate of the new head")
    backbone_lr_scale: float = _opt(0.3, "pretrained backbone learning rate as a fraction of the head's")
    weight_decay: float = _opt(0.02, "AdamW weight decay (not applied to norms and biases)")
    label_smoothing: float = _opt(0.05, "label smoothing of the (partial-label) cross-entropy")
    warmup_epochs: float = _opt(0.5, "linear warm-up, in epochs, before cosine decay")
    ema_decay: float = _opt(0.998, "weight EMA decay per step (0: off); EMA and raw weights both compete on "
                                   "validation")
    colour_constancy: str = _opt("none", "colour correction applied in training and serving alike (Shades of "
                                         "Gray was tried for the shipped model; see the model card)",
                                 choices=COLOUR_METHODS)
    extra_weight: float = _opt(2.0, "sampling weight of an --extra-train image relative to a main one (each set's "
                                    "classes are sampled at one common prior)")
    variant_cap: int = _opt(120, "images per class of the validation split scored under every robustness "
                                 "variant each epoch (0: clean validation only); model choice averages them")
    val_fraction: float = _opt(0.15, "share of the main set's lesions in the validation split")
    test_fraction: float = _opt(0.15, "share of the main set's lesions in the test split")
    seed: int = _opt(0, "seed of the split, sampling, augmentation and initialisation")
    pretrained: str | None = _opt("imagenet", "'imagenet' (installed package weights, no download), 'none', a "
                                              "torchvision weights name (downloads) or a local .pth file")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    threads: int = _opt(0, "torch intra-op threads (0: torch's default)")
    limit: int = _opt(0, "use at most this many images of the main set (smoke tests)")
    splits: str | None = _opt(None, "reuse this splits.csv instead of making a split")
    referral_sensitivity: float = _opt(0.90, "malignant (mel, bcc, akiec) sensitivity the default referral flag "
                                             "keeps on validation")
    version: str | None = _opt(None, "version string of the bundle (default: date, arch, size, seed)")
    extra_train: list[str] = _opt([], "another dataset whose every image joins the training split (repeatable)",
                                  metavar="DATA")
    holdout: list[str] = _opt([], "a held-out set: extra images that duplicate one of its images are dropped "
                                  "(repeatable)", metavar="DATA")
    extra_val: list[str] = _opt([], "another clinic's set whose melanoma AUC joins model choice; never trained on "
                                    "(repeatable)", metavar="DATA")

    def __post_init__(self) -> None:
        if not self.resize_size or self.resize_mode == "squash":
            self.resize_size = self.input_size
        if self.pretrained in ("", "none"):
            self.pretrained = None
        if self.colour_constancy not in COLOUR_METHODS:
            raise ValueError(f"colour_constancy must be one of {', '.join(COLOUR_METHODS)}")


# Fields a resumed run may change; every other one comes from the run's args.json.
RESUMABLE = ("out", "epochs", "device", "threads", "referral_sensitivity", "version")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per TrainConfig field (plus --resume) to a parser."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if f.default is MISSING and f.default_factory is MISSING:
            parser.add_argument(flag, required=True, help=f.metadata["help"], **extra)
        elif f.default_factory is list:
            parser.add_argument(flag, action="append", default=[], help=f.metadata["help"], **extra)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=f"{f.metadata['help']} (default: "
                                f"{f.default})", **extra)
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a TrainConfig from parsed `skinscan train` arguments."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
