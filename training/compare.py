"""`python -m training.compare`: validation figures of several bundles and of their mean (an ensemble), on one
run's validation split and its robustness variants, so a capacity step (longer schedule, larger input, another
network, an ensemble) is kept or dropped by validation alone, as the model card reports it."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skinscan.model.bundle import Bundle, load_bundle
from skinscan.model.metrics import classification_report
from training.calibration import fit_logit_offsets, softmax
from training.config import TrainConfig
from training.rundata import RunData, load_run_data
from training.train import predict_logits

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One model's (or ensemble's) calibrated validation probabilities: clean split and each variant subset."""

    name: str
    clean: np.ndarray
    variants: dict[str, np.ndarray]


def bundle_probs(bundle: Bundle, data: RunData, device: torch.device) -> Candidate:
    """Score the run's validation images and variants with one bundle's network, temperature and normalisation."""
    if bundle.input_size != data.val_images.shape[1]:
        raise ValueError(f"{bundle.version}: input {bundle.input_size} px, the run's validation images are "
                         f"{data.val_images.shape[1]} px; compare bundles of one input size")
    model = bundle.torch_model().to(device)
    mean = torch.tensor(bundle.meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(bundle.meta["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def probs(images: np.ndarray) -> np.ndarray:
        return softmax(predict_logits(model, images, mean, std, device), bundle.temperature)

    return Candidate(bundle.version, probs(data.val_images), {k: probs(v) for k, v in data.val_variants.items()})


def mean_of(candidates: list[Candidate]) -> Candidate:
    """The ensemble: the mean of the members' calibrated probabilities."""
    return Candidate(" + ".join(c.name for c in candidates), np.mean([c.clean for c in candidates], axis=0),
                     {k: np.mean([c.variants[k] for c in candidates], axis=0) for k in candidates[0].variants})


def figures(candidate: Candidate, data: RunData) -> dict[str, Any]:
    """Validation figures as training's model choice sees them (plain arg-max, mean over clean and variants) and
    with decision offsets fitted to this candidate on the same images (as training fits a bundle's)."""
    y = data.labels[data.val_idx]
    y_sub = y[data.val_variant_pos]
    offsets = fit_logit_offsets(np.concatenate([candidate.clean, *candidate.variants.values()]),
                                np.concatenate([y] + [y_sub] * len(candidate.variants)))
    clean, clean_c = (classification_report(y, candidate.clean),
                      classification_report(y, candidate.clean, logit_offsets=offsets))
    plain = [classification_report(y_sub, p)["balanced_accuracy"] for p in candidate.variants.values()]
    corrected = [classification_report(y_sub, p, logit_offsets=offsets)["balanced_accuracy"]
                 for p in candidate.variants.values()]
    return {
        "name": candidate.name,
        "balanced_accuracy": clean["balanced_accuracy"], "balanced_accuracy_corrected": clean_c["balanced_accuracy"],
        "score": float(np.mean([clean["balanced_accuracy"], *plain])),
        "score_corrected": float(np.mean([clean_c["balanced_accuracy"], *corrected])),
        "macro_auc": clean["macro_auc"], "melanoma_auc": clean["melanoma"]["auc"],
        "worst_variant_drop": float(clean_c["balanced_accuracy"] - min(corrected)) if corrected else None,
    }


def compare(run: Path, bundles: list[Path], ensemble: bool = True) -> list[dict[str, Any]]:
    """Figures of each bundle and (with ensemble) of their mean, on the validation split of the run folder."""
    cfg = TrainConfig(**json.loads((run / "args.json").read_text()))
    data = load_run_data(cfg, run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = [load_bundle(b) for b in bundles]
    for bundle in loaded:
        if bundle.resize_mode != cfg.resize_mode:
            raise ValueError(f"{bundle.version}: resize mode {bundle.resize_mode}, the run's is {cfg.resize_mode}")
    members = [bundle_probs(bundle, data, device) for bundle in loaded]
    rows = [figures(c, data) for c in members]
    if ensemble and len(members) > 1:
        rows.append(figures(mean_of(members), data))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print (and optionally write as JSON) the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run folder whose args.json gives the validation split")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--no-ensemble", action="store_true", help="compare the bundles only")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("bundles", nargs="+", type=Path, help="bundle folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = compare(args.run, args.bundles, ensemble=not args.no_ensemble)
    for r in rows:
        log.info("%-60s BA %.4f (corrected %.4f) | score %.4f (corrected %.4f) | macro AUC %.4f | mel AUC %.4f | "
                 "worst variant drop %.4f", r["name"], r["balanced_accuracy"], r["balanced_accuracy_corrected"],
                 r["score"], r["score_corrected"], r["macro_auc"], r["melanoma_auc"], r["worst_variant_drop"])
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
