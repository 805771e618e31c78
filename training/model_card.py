"""MODEL_CARD.md written from a bundle's metadata and `skinscan evaluate` reports, so its figures can be repeated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from skinscan.labels import CLASS_NAMES
from training.bundle import load_bundle


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _per_class_table(report: dict[str, Any]) -> list[str]:
    lines = ["| class | support | precision | recall | F1 | AUC |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in report["per_class"].items():
        if row["support"]:
            lines.append(f"| {name} ({CLASS_NAMES.get(name, name)}) | {row['support']} | {_f(row['precision'])} | "
                         f"{_f(row['recall'])} | {_f(row['f1'])} | {_f(row['auc'])} |")
    return lines


def _subgroup_table(report: dict[str, Any], key: str, min_n: int = 20) -> list[str]:
    groups = report.get("subgroups", {}).get(key, {})
    lines = [f"| {key.replace('_', ' ')} | n | balanced accuracy | melanoma recall | melanoma AUC |",
             "|---|---:|---:|---:|---:|"]
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["n"]):
        if g["n"] >= min_n:
            lines.append(f"| {name} | {g['n']} | {_f(g.get('balanced_accuracy'))} | "
                         f"{_f(g['recall'].get('mel'))} | {_f(g.get('melanoma_auc'))} |")
    return lines


def _headline(report: dict[str, Any]) -> list[str]:
    mel = report["melanoma"]
    rows = [("images", str(report["n_images"]))]
    if not report.get("melanoma_only"):
        rows += [("balanced multiclass accuracy", _f(report["balanced_accuracy"])),
                 ("accuracy", _f(report["accuracy"])), ("macro AUC (one-vs-rest)", _f(report["macro_auc"]))]
    rows += [("melanoma AUC (melanoma vs rest)", _f(mel["auc"])),
             ("melanoma sensitivity at specificity 0.80", _f(mel["sensitivity_at_specificity_0.80"])),
             ("melanoma sensitivity at specificity 0.90", _f(mel["sensitivity_at_specificity_0.90"])),
             ("malignant vs benign AUC", _f(report["malignant_auc"])),
             ("expected calibration error (15 bins), calibrated / uncalibrated",
              f"{_f(report['ece'])} / {_f(report.get('ece_uncalibrated'))}")]
    return ["| metric | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]


def _other_data(data: dict[str, Any]) -> list[str]:
    """Lines on the other collections a bundle was trained with, and on the held-out ISIC 2017 test split."""
    extra = data.get("extra_training_sets") or []
    if not extra:
        return ["- External test: ISIC 2017 official test split (600 images, CC-0), melanoma vs rest; no image is "
                "shared with HAM10000."]
    return [
        f"- Also trained on: {', '.join(f'`{name}`' for name in extra)}, every image in the training split "
        "(ISIC 2017: melanoma -> mel, seborrheic keratosis -> bkl, the rest -> nv; CC-0). Images that duplicate "
        f"one of the held-out sets ({', '.join(f'`{n}`' for n in data.get('held_out_sets') or []) or 'none'}) "
        "were dropped before training (`splits.csv` lists every image used and its split).",
        "- ISIC 2017 official test split (600 images), melanoma vs rest: held out, but no longer an external "
        "collection, since the model saw ISIC 2017's training images; HAM10000's validation split chose the epoch.",
    ]


def render(bundle_path: Path, reports: list[tuple[str, str, Path]], notes: str = "") -> str:
    """Return the model card text for a bundle and its (title, command, report path) evaluations."""
    bundle = load_bundle(bundle_path)
    meta = bundle.meta
    train = meta.get("training", {})
    cfg = train.get("config", {})
    val = meta.get("metrics", {}).get("validation", {})
    out = [
        f"# Model card: {meta.get('name')} `{bundle.version}`", "",
        "> **Decision support, not a diagnosis.** This model is for research and to help clinicians prioritise "
        "review. It is not a medical device, is not clinically validated, and must never be used to rule out "
        "skin cancer.", "",
        "## Model", "",
        f"- Architecture: torchvision `{meta['architecture']}` from random initialisation (no pretrained weights "
        "can be downloaded here)" + (f"; this run continued from `{cfg['pretrained']}`" if cfg.get("pretrained")
                                     else "") + ".",
        f"- Input: RGB, shorter side resized to {bundle.resize_size} px (bilinear), centre crop "
        f"{bundle.input_size} x {bundle.input_size}, normalised with the training set's mean "
        f"{[round(x, 3) for x in meta['mean']]} and std {[round(x, 3) for x in meta['std']]} (all in the bundle).",
        f"- Output: probabilities of HAM10000's seven classes ({', '.join(bundle.classes)}), temperature-scaled "
        f"(T = {bundle.temperature:.3f}, fitted on the validation split). Malignancy score = P(mel) + P(bcc) + "
        "P(akiec).",
        f"- Referral flag: malignancy score >= {meta['referral']['malignancy_threshold']:.3f} (chosen on the "
        f"validation split for melanoma sensitivity >= {meta['referral']['target_melanoma_sensitivity']}) or top "
        f"probability < {meta['referral']['uncertain_below']} (the model is unsure).",
        f"- Training: {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, AdamW lr {cfg.get('lr')} with warm-up "
        "and cosine decay, class imbalance handled by square-root-frequency sampling and loss weights, flips, "
        "rotations, zoom in/out and colour augmentation; best epoch "
        f"{train.get('best_epoch')} chosen on validation balanced accuracy; seed {cfg.get('seed')}; "
        f"{train.get('device', 'cpu')}, torch {train.get('torch')}.",
        "- Bundle files: `weights.pt` (float16), `model.onnx` (for ONNX Runtime), `metadata.json`, `splits.csv`.",
        "",
        "## Data and licence", "",
        "- Training data: HAM10000 (Tschandl et al., Sci. Data 5, 180161, 2018), 10,015 dermoscopic images of 7,470 "
        "lesions, **CC BY-NC-SA 4.0**: the model inherits the non-commercial, share-alike terms.",
        "- Split: grouped by `lesion_id` (and by known near-duplicate images), stratified by diagnosis, seed 0: "
        "70 % train, 15 % validation, 15 % test; no lesion is in two splits (`splits.csv` in the bundle, "
        "checked by `tests/test_training_splits.py`).",
    ] + _other_data(meta.get("training_data", {})) + [
        "",
        "## Validation (model selection and calibration only)", "",
        f"balanced accuracy {_f(val.get('balanced_accuracy'))}, macro AUC {_f(val.get('macro_auc'))}, melanoma AUC "
        f"{_f(val.get('melanoma_auc'))}, ECE {_f(val.get('ece_before_calibration'))} before and "
        f"{_f(val.get('ece'))} after temperature scaling.", "",
    ]
    for title, command, path in reports:
        report = json.loads(path.read_text())
        out += [f"## {title}", "", f"`{command}`", ""] + _headline(report) + [""]
        if not report.get("melanoma_only"):
            out += _per_class_table(report) + [""]
        stem = path.with_suffix("").as_posix()
        out += [f"Plots: [confusion matrix]({stem}_confusion.png), [ROC curves]({stem}_roc.png), "
                f"[reliability diagram]({stem}_reliability.png).", ""]
        if report.get("subgroups") and not report.get("melanoma_only"):
            out += ["Per-subgroup figures on this split (groups with at least 20 images):", ""]
            for key in ("sex", "age_band", "body_site"):
                out += _subgroup_table(report, key) + [""]
    out += ["## Known limits and biases", "", notes.strip(), ""]
    return "\n".join(line.replace(str(Path.cwd()) + "/", "") for line in out)


def main(argv: list[str] | None = None) -> int:
    """Write MODEL_CARD.md: python -m training.model_card --model B --report 'TITLE::COMMAND::REPORT.json' ..."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--report", action="append", default=[], help="TITLE::COMMAND::PATH of an evaluate report")
    parser.add_argument("--notes", type=Path, required=True, help="markdown file: known limits and biases")
    parser.add_argument("--out", type=Path, default=Path("MODEL_CARD.md"))
    args = parser.parse_args(argv)
    reports = [(t, c, Path(p)) for t, c, p in (r.split("::", 2) for r in args.report)]
    args.out.write_text(render(args.model, reports, args.notes.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
