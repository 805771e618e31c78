"""`skinscan evaluate`: score a bundle on a labelled dataset; JSON report, per-image CSV and plots."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm import tqdm

from skinscan.imaging import ImageError, decode_rgb
from skinscan.labels import MALIGNANT
from skinscan.model.bundle import METADATA_FILE, Bundle, load_bundle
from skinscan.model.metrics import ECE_BINS, classification_report, expected_calibration_error, reliability_bins
from skinscan.model.predictor import Predictor, load_predictor
from training.calibration import flag_figures, softmax
from training.datasets import Dataset, DatasetError, Sample, read_dataset
from training.perturb import VARIANT_HELP, VARIANTS, apply_variant

log = logging.getLogger(__name__)

AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<30", 0.0, 30.0), ("30-44", 30.0, 45.0), ("45-59", 45.0, 60.0), ("60-74", 60.0, 75.0),
    ("75+", 75.0, 1e9),
)
# Metadata columns holding each subgroup attribute, in the datasets SkinScan reads (HAM10000, ISIC 2017/2019).
SEX_KEYS = ("sex",)
AGE_KEYS = ("age", "age_approximate", "age_approx")
SITE_KEYS = ("localization", "anatom_site_general", "anatom_site_general_challenge")
UNKNOWN_VALUES = frozenset({"", "unknown", "nan", "none", "na", "n/a"})


def _first(meta: dict[str, str], keys: Sequence[str]) -> str | None:
    """Return the first of keys present in meta with a known value, lower-cased, or None."""
    for key in keys:
        value = str(meta.get(key, "")).strip().lower()
        if value not in UNKNOWN_VALUES:
            return value
    return None


def age_band(meta: dict[str, str]) -> str | None:
    """Return the age band (<30, 30-44, 45-59, 60-74, 75+) of a sample's metadata, or None if unknown."""
    value = _first(meta, AGE_KEYS)
    if value is None:
        return None
    try:
        age = float(value)
    except ValueError:
        return None
    for name, low, high in AGE_BANDS:
        if low <= age < high:
            return name
    return None


def _group_figures(
    y: np.ndarray, pred: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Return n, per-class recall and support, balanced accuracy and melanoma AUC of one subgroup."""
    recall: dict[str, float] = {}
    support: dict[str, int] = {}
    for i, name in enumerate(classes):
        mask = y == i
        if mask.any():
            support[name] = int(mask.sum())
            recall[name] = float((pred[mask] == i).mean())
    out: dict[str, Any] = {
        "n": int(len(y)), "recall": recall, "support": support,
        "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else None,
        "melanoma_auc": None,
    }
    if "mel" in classes:
        mel = list(classes).index("mel")
        y_mel = (y == mel).astype(int)
        if 0 < y_mel.sum() < len(y_mel):
            out["melanoma_auc"] = float(roc_auc_score(y_mel, probs[:, mel]))
    return out


def subgroup_report(samples: Sequence[Sample], y: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                    pred: np.ndarray | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Return per-sex, per-age-band and per-body-site figures, for the attributes the metadata has (decisions:
    pred, else the arg-max of probs)."""
    pred = probs.argmax(axis=1) if pred is None else pred
    attributes = {
        "sex": [_first(s.meta, SEX_KEYS) for s in samples],
        "age_band": [age_band(s.meta) for s in samples],
        "body_site": [_first(s.meta, SITE_KEYS) for s in samples],
    }
    band_order = [b[0] for b in AGE_BANDS]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for attribute, values in attributes.items():
        known = sorted({v for v in values if v is not None},
                       key=lambda v: band_order.index(v) if attribute == "age_band" else v)
        if not known:
            continue
        groups: dict[str, dict[str, Any]] = {}
        arr = np.array([v if v is not None else "unknown" for v in values], dtype=object)
        for value in [*known, "unknown"]:
            mask = arr == value
            if mask.any():
                groups[value] = _group_figures(y[mask], pred[mask], probs[mask], classes)
        out[attribute] = groups
    return out


def _batches(samples: Sequence[Sample], bundle: Bundle, batch_size: int,
             skipped: list[dict[str, str]]) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (sample indices, N x 3 x S x S float32 batch) decoded and preprocessed as the bundle says; an image
    that fails to decode is logged and recorded in skipped."""
    indices: list[int] = []
    crops: list[np.ndarray] = []
    for i, sample in enumerate(tqdm(samples, desc="evaluating", unit="img", mininterval=2)):
        try:
            img = decode_rgb(sample.path.read_bytes(), draft_size=bundle.resize_size)
        except (ImageError, OSError) as exc:
            log.warning("skipping %s (%s): %s", sample.image_id, sample.path, exc)
            skipped.append({"image_id": sample.image_id, "reason": str(exc)})
            continue
        indices.append(i)
        crops.append(np.asarray(bundle.resize_crop(img)))
        if len(crops) == batch_size:
            yield indices, bundle.normalize(np.stack(crops))
            indices, crops = [], []
    if crops:
        yield indices, bundle.normalize(np.stack(crops))


def _variant_batches(samples: Sequence[Sample], bundle: Bundle, batch_size: int,
                     variants: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (variant, N x 3 x S x S batch) for every variant, decoding each full-size image once (not once per
    variant: a large original costs ~0.2 s to decode); each variant's batches keep the samples' order."""
    pending: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    for sample in tqdm(samples, desc=f"evaluating {len(variants)} variants", unit="img", mininterval=2):
        try:
            # A perturbed copy starts from the full-size image, as another clinic's file would.
            rgb = np.asarray(decode_rgb(sample.path.read_bytes()))
        except (ImageError, OSError) as exc:  # the clean pass decoded every one of these images
            raise DatasetError(f"{sample.image_id} failed to decode for the robustness variants: {exc}") from exc
        for variant in variants:
            pending[variant].append(np.asarray(bundle.resize_crop(Image.fromarray(apply_variant(variant, rgb)))))
            if len(pending[variant]) == batch_size:
                yield variant, bundle.normalize(np.stack(pending[variant]))
                pending[variant] = []
    for variant, crops in pending.items():
        if crops:
            yield variant, bundle.normalize(np.stack(crops))


def _tta_logits(predictor: Predictor, batch: np.ndarray, tta: bool) -> np.ndarray:
    """Return logits, averaged over horizontal, vertical and both flips when tta is set."""
    if not tta:
        return predictor.predict_logits(batch)
    views = (batch, batch[:, :, :, ::-1], batch[:, :, ::-1, :], batch[:, :, ::-1, ::-1])
    return np.mean([predictor.predict_logits(np.ascontiguousarray(v)) for v in views], axis=0)


def _save(fig: Figure, path: Path) -> None:
    """Render a figure with the Agg canvas (no pyplot, no global backend) and write it as PNG."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Draw the row-normalised confusion matrix with counts (rows: true classes present; cols: predicted)."""
    rows = [i for i in range(len(classes)) if matrix[i].sum() > 0]
    sub = matrix[rows].astype(np.float64)
    norm = sub / sub.sum(axis=1, keepdims=True)
    fig = Figure(figsize=(1.1 * len(classes) + 2.0, 0.8 * len(rows) + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for r in range(len(rows)):
        for c in range(len(classes)):
            colour = "white" if norm[r, c] > 0.5 else "black"
            ax.text(c, r, f"{norm[r, c]:.2f}\n({int(sub[r, c])})", ha="center", va="center", fontsize=8,
                    color=colour)
    ax.set_xticks(range(len(classes)), list(classes))
    ax.set_yticks(range(len(rows)), [classes[i] for i in rows])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    _save(fig, path)


def plot_roc(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Draw one-vs-rest ROC curves of each class present and malignant-vs-benign, AUCs in the legend."""
    fig = Figure(figsize=(6.0, 5.5))
    ax = fig.add_subplot()
    curves: list[tuple[str, np.ndarray, np.ndarray, bool]] = []
    for i, name in enumerate(classes):
        yb = (y == i).astype(int)
        if 0 < yb.sum() < len(yb):
            curves.append((name, yb, probs[:, i], name == "mel"))
    malignant = [i for i, c in enumerate(classes) if c in MALIGNANT]
    y_malig = np.isin(y, malignant).astype(int)
    if 0 < y_malig.sum() < len(y_malig):
        curves.append(("malignant (mel+bcc+akiec)", y_malig, probs[:, malignant].sum(axis=1), False))
    for name, yb, score, bold in curves:
        fpr, tpr, _ = roc_curve(yb, score)
        style = {"linewidth": 2.5, "color": "black"} if bold else {"linewidth": 1.2}
        if name.startswith("malignant"):
            style = {"linewidth": 2.0, "linestyle": "--", "color": "crimson"}
        label = "melanoma (mel)" if name == "mel" else name
        ax.plot(fpr, tpr, label=f"{label}: AUC {roc_auc_score(yb, score):.3f}", **style)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_reliability(y: np.ndarray, probs: np.ndarray, probs_uncalibrated: np.ndarray, temperature: float,
                     path: Path, title: str) -> None:
    """Draw the reliability diagram (accuracy against confidence) before and after temperature scaling."""
    fig = Figure(figsize=(6.0, 6.5))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8, label="perfect calibration")
    width = 1.0 / ECE_BINS
    for p, label, colour, marker in (
        (probs_uncalibrated, "uncalibrated (T=1)", "tab:orange", "s"),
        (probs, f"calibrated (T={temperature:.3g})", "tab:blue", "o"),
    ):
        bins = reliability_bins(p, y)
        ece = expected_calibration_error(p, y, ECE_BINS)
        ax.plot(bins["confidence"], bins["accuracy"], marker=marker, color=colour,
                label=f"{label}: ECE {ece:.3f}")
        hist.bar(bins["center"], bins["count"], width=width * 0.9, alpha=0.5, color=colour)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_ylabel("accuracy of top prediction")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("confidence of top prediction")
    hist.set_ylabel("images")
    _save(fig, path)


def write_predictions(path: Path, samples: Sequence[Sample], y: np.ndarray, probs: np.ndarray,
                      classes: Sequence[str], predicted: np.ndarray | None = None) -> None:
    """Write image_id, label, predicted (the bundle's decision; arg-max if none given) and the calibrated
    probability of every class per image."""
    predicted = probs.argmax(axis=1) if predicted is None else predicted
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "label", "predicted", *[f"prob_{c}" for c in classes]])
        for sample, label, row, pred in zip(samples, y, probs, predicted, strict=True):
            writer.writerow([sample.image_id, classes[label], classes[int(pred)], *[f"{p:.6f}" for p in row]])


def _decision_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a report that depend on the decision rule: balanced accuracy, recalls, predicted counts."""
    return {
        "balanced_accuracy": report["balanced_accuracy"], "accuracy": report["accuracy"],
        "recall": {c: f["recall"] for c, f in report["per_class"].items()},
        "predicted_counts": report["predicted_counts"],
    }


def robustness_report(bundle: Bundle, predictor: Predictor, samples: Sequence[Sample], y: np.ndarray,
                      clean: dict[str, Any], batch_size: int, tta: bool) -> dict[str, Any]:
    """Score the same images under every robustness variant: per variant balanced accuracy (decision rule and
    plain arg-max), macro and melanoma AUC, predicted and true class counts, and each figure's change from clean."""
    classes = bundle.classes
    perturbed = [v for v in VARIANTS if v != "clean"]
    logits: dict[str, list[np.ndarray]] = {v: [] for v in perturbed}
    for variant, batch in _variant_batches(samples, bundle, batch_size, perturbed):
        logits[variant].append(_tta_logits(predictor, batch, tta))
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        if variant == "clean":
            rep, plain = clean, clean["plain_argmax"]
        else:
            probs = softmax(np.concatenate(logits[variant]).astype(np.float64), bundle.temperature)
            rep = classification_report(y, probs, classes, known_labels=clean["known_labels"],
                                        logit_offsets=bundle.logit_offsets)
            plain = _decision_figures(classification_report(y, probs, classes, known_labels=clean["known_labels"]))
        true_mel = rep["true_counts"]["mel"]
        out[variant] = {
            "description": VARIANT_HELP[variant],
            "balanced_accuracy": rep["balanced_accuracy"], "balanced_accuracy_plain": plain["balanced_accuracy"],
            "macro_auc": rep["macro_auc"], "melanoma_auc": rep["melanoma"]["auc"],
            "predicted_counts": rep["predicted_counts"], "true_counts": rep["true_counts"],
            "melanoma_calls_ratio": (rep["predicted_counts"]["mel"] / true_mel) if true_mel else None,
            "balanced_accuracy_change": rep["balanced_accuracy"] - clean["balanced_accuracy"],
        }
        log.info("robustness %s: balanced accuracy %.4f (plain %.4f), melanoma AUC %s, melanoma calls %d of %d",
                 variant, rep["balanced_accuracy"], plain["balanced_accuracy"],
                 "n/a" if rep["melanoma"]["auc"] is None else f"{rep['melanoma']['auc']:.4f}",
                 rep["predicted_counts"]["mel"], true_mel)
    return out


def plot_robustness(robustness: dict[str, Any], classes: Sequence[str], path: Path, title: str,
                    melanoma_only: bool) -> None:
    """Bar charts per variant: balanced accuracy (melanoma AUC for a melanoma-only set) and melanoma calls
    against the true count."""
    names = list(robustness)
    fig = Figure(figsize=(10, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    key = "melanoma_auc" if melanoma_only else "balanced_accuracy"
    values = [robustness[n][key] or 0.0 for n in names]
    ax1.barh(names, values, color="#4c72b0")
    ax1.axvline(values[0], color="k", lw=0.8, ls="--")
    ax1.set_xlabel("melanoma AUC" if melanoma_only else "balanced accuracy (decision rule)")
    ax1.invert_yaxis()
    ratios = [robustness[n]["melanoma_calls_ratio"] or 0.0 for n in names]
    ax2.barh(names, ratios, color="#c44e52")
    for x in (0.8, 1.0, 1.2):
        ax2.axvline(x, color="k", lw=0.8, ls="-" if x == 1.0 else ":")
    ax2.set_xlabel("images called melanoma / truly melanoma")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle(f"Robustness: {title}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def referral_report(bundle: Bundle, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Sensitivity, specificity and flag rate of the referral flag at the default and every operating point.

    The flag here is the malignancy-score rule alone (the service also refers images the model is unsure of)."""
    malignant = [i for i, c in enumerate(classes) if c in bundle.malignant_classes]
    score = probs[:, malignant].sum(axis=1)
    uncertain = probs.max(axis=1) < float((bundle.meta.get("referral") or {}).get("uncertain_below", 0.0))
    positive = np.isin(y, malignant)

    def at(threshold: float) -> dict[str, Any]:
        figures = flag_figures(positive, score, threshold)
        return {
            "threshold": threshold, "malignant_sensitivity": figures["sensitivity"],
            "specificity": figures["specificity"], "flag_rate": figures["flag_rate"],
            "flag_rate_with_uncertain": float(((score >= threshold) | uncertain).mean()),
        }

    return {
        "default": at(bundle.referral_threshold()),
        "operating_points": [{"target_sensitivity": p["target_sensitivity"]} | at(float(p["threshold"]))
                             for p in bundle.operating_points],
        "n_malignant": int(positive.sum()),
    }


def output_paths(out_json: str | Path) -> dict[str, Path]:
    """Return where the report, predictions CSV and the three plots of an evaluation go."""
    out = Path(out_json)
    stem = out.stem
    return {
        "report": out,
        "predictions": out.with_name(f"{stem}_predictions.csv"),
        "confusion": out.with_name(f"{stem}_confusion.png"),
        "roc": out.with_name(f"{stem}_roc.png"),
        "reliability": out.with_name(f"{stem}_reliability.png"),
        "robustness": out.with_name(f"{stem}_robustness.png"),
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Return the compact figures of a report that are recorded in a bundle's metadata."""
    mel = report["melanoma"]
    return {
        "dataset": report["dataset"], "format": report["format"], "n_images": report["n_images"],
        "melanoma_only": report["melanoma_only"], "tta": report["tta"], "backend": report["backend"],
        "balanced_accuracy": report["balanced_accuracy"], "accuracy": report["accuracy"],
        "macro_auc": report["macro_auc"], "melanoma_auc": mel["auc"],
        "melanoma_sensitivity_at_specificity_0.80": mel["sensitivity_at_specificity_0.80"],
        "melanoma_sensitivity_at_specificity_0.90": mel["sensitivity_at_specificity_0.90"],
        "malignant_auc": report["malignant_auc"], "ece": report["ece"],
        "referral_flag_rate": (report.get("referral") or {}).get("default", {}).get("flag_rate"),
        "referral_malignant_sensitivity":
            (report.get("referral") or {}).get("default", {}).get("malignant_sensitivity"),
        "ece_uncalibrated": report["ece_uncalibrated"], "evaluated_at": report["evaluated_at"],
    }


def headline(report: dict[str, Any]) -> str:
    """Return a one-line description of a report's headline figures for logs."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    mel = report["melanoma"]
    first = (f"melanoma vs rest AUC {fmt(mel['auc'])}" if report["melanoma_only"]
             else f"balanced accuracy {fmt(report['balanced_accuracy'])}, "
                  f"macro AUC {fmt(report['macro_auc'])}, melanoma AUC {fmt(mel['auc'])}")
    return (f"{report['model_version']} on {report['dataset']} ({report['n_images']} images"
            f"{', TTA' if report['tta'] else ''}): {first}, melanoma sensitivity at 90% specificity "
            f"{fmt(mel['sensitivity_at_specificity_0.90'])}, malignant AUC {fmt(report['malignant_auc'])}, "
            f"ECE {fmt(report['ece'])} (uncalibrated {fmt(report['ece_uncalibrated'])})")


def record_evaluation(bundle: Bundle, name: str, report: dict[str, Any]) -> None:
    """Store a report's summary in metadata.json as metrics.evaluations.<name>, leaving weights untouched."""
    meta_path = bundle.path / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta.setdefault("metrics", {}).setdefault("evaluations", {})[name] = summary(report)
    tmp = meta_path.with_name(f".{METADATA_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    tmp.replace(meta_path)
    load_bundle(bundle.path)  # the checksums of the weights must still hold
    log.info("recorded evaluation %r in %s", name, meta_path)


def evaluate(
    bundle_path: str | Path | None,
    data_path: str | Path,
    out_json: str | Path,
    tta: bool = False,
    backend: str = "auto",
    batch_size: int = 64,
    record: bool = False,
    name: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    split_file: str | Path | None = None,
    split: str = "test",
    perturb: bool = False,
) -> dict[str, Any]:
    """Evaluate a bundle (the packaged default when None) on a dataset; write the report, CSV and plots.

    With split_file (a splits.csv written by `skinscan train`), only the images of that split are used. With
    perturb, the report adds the robustness report: the same images under every variant of `training.perturb`.
    """
    if bundle_path is None:
        from skinscan.bundles import default_bundle_path

        bundle_path = default_bundle_path()
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    bundle = load_bundle(bundle_path)
    dataset: Dataset = read_dataset(data_path)
    if split_file is not None:
        from training.splits import read_splits

        wanted = read_splits(Path(split_file))
        kept_samples = [s for s in dataset.samples if wanted.get(s.image_id) == split]
        if not kept_samples:
            raise DatasetError(f"{split_file}: no image of {data_path} is in split {split!r}")
        dataset = Dataset(f"{dataset.name}-{split}", dataset.format, kept_samples, dataset.known_labels)
    classes = bundle.classes
    unknown = sorted({s.label for s in dataset.samples} - set(classes))
    if unknown:
        raise DatasetError(
            f"{data_path}: labels {', '.join(unknown)} are not classes of the model ({', '.join(classes)})"
        )
    predictor = load_predictor(bundle, backend=backend, device=device, threads=threads)
    log.info("evaluating %s (%s backend) on %s: %d images (%s)%s", bundle.version, predictor.backend,
             dataset.name, len(dataset.samples), dataset.format, " with TTA" if tta else "")

    skipped: list[dict[str, str]] = []
    kept: list[int] = []
    logits_parts: list[np.ndarray] = []
    for indices, batch in _batches(dataset.samples, bundle, batch_size, skipped):
        kept.extend(indices)
        logits_parts.append(_tta_logits(predictor, batch, tta))
    if not kept:
        raise DatasetError(f"{data_path}: none of the {len(dataset.samples)} images could be decoded")
    samples = [dataset.samples[i] for i in kept]
    logits = np.concatenate(logits_parts).astype(np.float64)
    y = np.array([classes.index(s.label) for s in samples], dtype=np.int64)
    probs = softmax(logits, bundle.temperature)
    probs_uncalibrated = softmax(logits, 1.0)

    offsets = bundle.logit_offsets
    report = classification_report(y, probs, classes, known_labels=dataset.known_labels, logit_offsets=offsets)
    plain = classification_report(y, probs, classes, known_labels=dataset.known_labels)
    melanoma_only = dataset.melanoma_only
    report.update({
        "model_version": bundle.version,
        "model_name": bundle.meta.get("name"),
        "dataset": dataset.name,
        "format": dataset.format,
        "tta": bool(tta),
        "backend": predictor.backend,
        "device": str(predictor.device),
        "temperature": bundle.temperature,
        "ece_uncalibrated": expected_calibration_error(probs_uncalibrated, y, ECE_BINS),
        "melanoma_only": melanoma_only,
        "headline": ({"metric": "melanoma_auc", "value": report["melanoma"]["auc"]} if melanoma_only
                     else {"metric": "balanced_accuracy", "value": report["balanced_accuracy"]}),
        "subgroups": subgroup_report(samples, y, probs, classes, bundle.decide(probs)),
        "referral": referral_report(bundle, y, probs, classes),
        "decision": {"rule": "class-prior corrected" if np.any(offsets) else "arg-max",
                     "logit_offsets": [float(v) for v in offsets]},
        "plain_argmax": _decision_figures(plain),
        "n_labelled": len(dataset.samples),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "evaluated_at": datetime.now(UTC).isoformat(),
    })

    paths = output_paths(out_json)
    paths["report"].parent.mkdir(parents=True, exist_ok=True)
    paths.pop("robustness")  # written only with perturb
    report["files"] = {k: p.name for k, p in paths.items() if k != "report"}
    title = f"{bundle.version} on {dataset.name} (n={len(samples)}{', TTA' if tta else ''})"
    plot_confusion(np.asarray(report["confusion_matrix"]), classes, paths["confusion"], title)
    plot_roc(y, probs, classes, paths["roc"], title)
    plot_reliability(y, probs, probs_uncalibrated, bundle.temperature, paths["reliability"], title)
    write_predictions(paths["predictions"], samples, y, probs, classes, bundle.decide(probs))
    if perturb:
        report["robustness"] = robustness_report(bundle, predictor, samples, y, report, batch_size, tta)
        paths["robustness"] = output_paths(out_json)["robustness"]
        report["files"]["robustness"] = paths["robustness"].name
        plot_robustness(report["robustness"], classes, paths["robustness"], title, melanoma_only)
    paths["report"].write_text(json.dumps(report, indent=2) + "\n")
    log.info("report written to %s", paths["report"])
    if record:
        record_evaluation(bundle, name or dataset.name, report)
    return report
