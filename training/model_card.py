"""MODEL_CARD.md written from a bundle's metadata, its `splits.csv`, `skinscan evaluate` reports and the training
runs that were compared, so every figure and claim in it can be repeated (nothing is typed in by hand)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from skinscan.labels import CLASS_NAMES
from skinscan.model.bundle import load_bundle

# Licences of the collections SkinScan reads, by the start of the name a bundle records for them.
LICENCES = {"HAM10000": "CC BY-NC-SA 4.0", "ISIC-2017": "CC-0", "ISIC2017": "CC-0"}

# The quality bar set for the shipped model (held-out test figures); the card says which holds and by how much.
# A negative bound is an upper limit ("at most").
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("HAM10000 test", "balanced_accuracy", "balanced multiclass accuracy", 0.80),
    ("HAM10000 test", "macro_auc", "macro AUC", 0.95),
    ("HAM10000 test", "ece", "expected calibration error after temperature scaling (at most)", -0.05),
    ("HAM10000 test", "referral_malignant_sensitivity", "malignant sensitivity at the default referral point", 0.90),
    ("HAM10000 test", "referral_flag_rate", "flag rate at the default referral point (at most)", -0.45),
    ("HAM10000 test", "robust_worst_drop", "largest balanced-accuracy drop of a robustness variant (at most)", -0.03),
    ("HAM10000 test", "robust_worst_mel_ratio_error",
     "largest departure of a variant's melanoma calls from the true count (at most)", -0.20),
    ("ISIC 2017 test", "melanoma_auc", "melanoma AUC (melanoma vs rest)", 0.80),
    ("ISIC 2017 test", "mel_calls_ratio", "images called melanoma / truly melanoma (at most)", -1.5),
)


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _licence(name: str) -> str:
    return next((lic for prefix, lic in LICENCES.items() if name.startswith(prefix)), "see the dataset")


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a full `skinscan evaluate` report, flat."""
    mel = report["melanoma"]
    default = (report.get("referral") or {}).get("default") or {}
    counts, truth = report.get("predicted_counts") or {}, report.get("true_counts") or {}
    robust = report.get("robustness") or {}
    drops = [-r["balanced_accuracy_change"] for n, r in robust.items() if n != "clean"]
    ratios = [abs(r["melanoma_calls_ratio"] - 1.0) for r in robust.values() if r["melanoma_calls_ratio"] is not None]
    plain = report.get("plain_argmax") or {}
    return {
        "n_images": report["n_images"],
        "balanced_accuracy": None if report.get("melanoma_only") else report["balanced_accuracy"],
        "balanced_accuracy_plain": None if report.get("melanoma_only") else plain.get("balanced_accuracy"),
        "mel_calls": (f"{counts['mel']} / {truth['mel']}" if "mel" in counts and "mel" in truth else None),
        "mel_calls_ratio": counts["mel"] / truth["mel"] if truth.get("mel") and "mel" in counts else None,
        "robust_mean_ba": (None if report.get("melanoma_only") or not robust
                           else sum(r["balanced_accuracy"] for r in robust.values()) / len(robust)),
        "robust_worst_drop": None if report.get("melanoma_only") or not drops else max(drops),
        "robust_worst_mel_ratio_error": max(ratios) if ratios else None,
        "macro_auc": None if report.get("melanoma_only") else report["macro_auc"],
        "melanoma_auc": mel["auc"],
        "melanoma_sens_spec80": mel["sensitivity_at_specificity_0.80"],
        "melanoma_sens_spec90": mel["sensitivity_at_specificity_0.90"],
        "malignant_auc": report["malignant_auc"],
        "ece": report["ece"],
        "ece_uncalibrated": report.get("ece_uncalibrated"),
        "referral_malignant_sensitivity": default.get("malignant_sensitivity"),
        "referral_flag_rate": default.get("flag_rate"),
    }


ROWS = (
    ("n_images", "images", "int"), ("balanced_accuracy", "balanced multiclass accuracy (the bundle's decision rule)",
                                    "num"),
    ("balanced_accuracy_plain", "balanced multiclass accuracy, plain arg-max", "num"),
    ("robust_mean_ba", "balanced accuracy, mean over the robustness variants", "num"),
    ("robust_worst_drop", "largest balanced-accuracy drop of a variant", "num"),
    ("macro_auc", "macro AUC (one-vs-rest)", "num"), ("melanoma_auc", "melanoma AUC (melanoma vs rest)", "num"),
    ("melanoma_sens_spec80", "melanoma sensitivity at specificity 0.80", "num"),
    ("melanoma_sens_spec90", "melanoma sensitivity at specificity 0.90", "num"),
    ("malignant_auc", "malignant vs benign AUC", "num"),
    ("ece", "expected calibration error (15 bins), calibrated", "num"),
    ("ece_uncalibrated", "expected calibration error, uncalibrated", "num"),
    ("referral_malignant_sensitivity", "malignant sensitivity at the default referral point", "num"),
    ("referral_flag_rate", "flag rate at the default referral point", "pct"),
    ("mel_calls", "images called melanoma / truly melanoma", "text"),
    ("robust_worst_mel_ratio_error", "largest departure of a variant's melanoma calls from the true count", "pct"),
)


def _cell(value: Any, kind: str) -> str:
    if kind == "text":
        return "n/a" if value is None else str(value)
    if kind == "int":
        return "n/a" if value is None else str(value)
    return _pct(value) if kind == "pct" else _f(value)


def _headline_table(tests: list[tuple[str, dict[str, Any]]], previous: dict[str, dict[str, Any]],
                    previous_version: str | None) -> list[str]:
    """Metric rows by test set: this model, and the previous one beside it where its report is given."""
    header = ["metric"]
    for title, _ in tests:
        header.append(f"{title}: this model")
        if title in previous:
            header.append(f"{title}: previous ({previous_version or 'earlier model'})")
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for key, label, kind in ROWS:
        cells = [label]
        for title, figures in tests:
            cells.append(_cell(figures.get(key), kind))
            if title in previous:
                cells.append(_cell(previous[title].get(key), kind))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets(tests: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | held |", "|---|---:|---|"]
    for title, key, label, bound in TARGETS:
        value = tests.get(title, {}).get(key)
        at_most = bound < 0
        limit = abs(bound)
        if value is None:
            verdict = "not measured"
        elif (value <= limit) if at_most else (value >= limit):
            verdict = "yes"
        else:
            verdict = f"no, by {abs(value - limit):.3f}"
        sign = "<=" if at_most else ">="
        lines.append(f"| {title}: {label} {sign} {limit:g} | {_f(value)} | {verdict} |")
    return lines


def _robustness_table(report: dict[str, Any], previous: dict[str, Any] | None) -> list[str]:
    """Per robustness variant: balanced accuracy (decision rule, plain arg-max), melanoma AUC, melanoma calls
    against the true count and the full predicted class counts; the previous model's beside where given."""
    robust = report.get("robustness") or {}
    if not robust:
        return []
    classes = list(next(iter(robust.values()))["true_counts"])
    prev = (previous or {}).get("robustness") or {}
    header = ["variant", "balanced accuracy (change)", "plain arg-max", "melanoma AUC", "melanoma calls / true"]
    if prev:
        header += ["previous model: balanced accuracy", "previous: melanoma AUC", "previous: melanoma calls"]
    header += [f"predicted {', '.join(classes)}"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    melanoma_only = report.get("melanoma_only")
    for name, r in robust.items():
        ba = "n/a" if melanoma_only else f"{_f(r['balanced_accuracy'])} ({r['balanced_accuracy_change']:+.3f})"
        cells = [f"{name}: {r['description']}", ba,
                 "n/a" if melanoma_only else _f(r["balanced_accuracy_plain"]), _f(r["melanoma_auc"]),
                 f"{r['predicted_counts']['mel']} / {r['true_counts']['mel']}"]
        if prev:
            p = prev.get(name) or {}
            cells += ["n/a" if melanoma_only or not p else _f(p.get("balanced_accuracy")), _f(p.get("melanoma_auc")),
                      f"{p['predicted_counts']['mel']} / {p['true_counts']['mel']}" if p else "n/a"]
        cells.append(" / ".join(str(r["predicted_counts"][c]) for c in classes))
        lines.append("| " + " | ".join(cells) + " |")
    truth = " / ".join(str(next(iter(robust.values()))["true_counts"][c]) for c in classes)
    lines += ["", f"True counts ({', '.join(classes)}): {truth}."]
    return lines


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


def _operating_points(meta: dict[str, Any], tests: list[tuple[str, dict[str, Any]]]) -> list[str]:
    referral = meta.get("referral") or {}
    points = referral.get("operating_points") or []
    if not points:
        return []
    header = ["target sensitivity", "threshold", "validation sensitivity", "validation specificity",
              "validation flag rate"] + [f"{title} {what}" for title, _ in tests
                                         for what in ("malignant sensitivity", "flag rate")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for i, p in enumerate(points):
        default = abs(p["target_sensitivity"] - referral.get("target_malignant_sensitivity", -1)) < 1e-9
        cells = [f"{p['target_sensitivity']:.2f}" + (" (default)" if default else ""), _f(p["threshold"]),
                 _f(p["sensitivity"]), _f(p["specificity"]), _pct(p["flag_rate"])]
        for _, report in tests:
            test_points = (report.get("referral") or {}).get("operating_points") or []
            point = test_points[i] if i < len(test_points) else {}
            cells += [_f(point.get("malignant_sensitivity")), _pct(point.get("flag_rate"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _split_facts(bundle_path: Path) -> list[str]:
    """What splits.csv shows: images per split and source, lesions, and that no group spans two splits."""
    path = bundle_path / "splits.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    per_group: dict[str, set[str]] = {}
    for row in rows:
        if row["split"] != "unused":
            per_group.setdefault(row["group"], set()).add(row["split"])
    crossing = sum(1 for s in per_group.values() if len(s) > 1)
    counts = Counter(row["split"] for row in rows)
    lesions = len({row["lesion_id"] for row in rows if row["lesion_id"].startswith("HAM_")})
    return [f"- `splits.csv` lists {len(rows):,} images ({counts['train']:,} train, {counts['val']:,} validation, "
            f"{counts['test']:,} test, {counts['unused']:,} unused) in {len(per_group):,} lesion-or-duplicate groups"
            + (f" ({lesions:,} HAM10000 lesions)" if lesions else "") + f"; groups spanning two splits: {crossing} "
            "(checked again by `tests/test_training_splits.py`)."]


def _best(history: list[dict[str, Any]]) -> tuple[float, int, str, dict[str, Any]] | None:
    """The best (score, epoch, weights, figures) of a run's history, raw and EMA weights alike."""
    best: tuple[float, int, str, dict[str, Any]] | None = None
    for entry in history:
        for prefix, name in (("val", "raw"), ("ema_val", "EMA")):
            score = entry.get(f"{prefix}_score")
            if score is not None and (best is None or score > best[0]):
                best = (score, entry["epoch"], name, {k[len(prefix) + 1:]: v for k, v in entry.items()
                                                      if k.startswith(prefix + "_")})
    return best


def _runs_table(runs: list[Path]) -> list[str]:
    """The compared runs: what differed, and their best validation figures within the epochs all of them ran
    (the choice was made on these), then over each run's whole length."""
    if not runs:
        return []
    loaded = []
    for run in runs:
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
        loaded.append((run, json.loads((run / "args.json").read_text()), history))
    common = min(len(h) for _, _, h in loaded)
    lines = ["| run | colour constancy | arch, input | epochs run | best in the first "
             f"{common} epochs: epoch (weights) | validation balanced accuracy | ISIC 2017 validation melanoma AUC | "
             "selection score | best over the whole run: epoch (weights), score |",
             "|---|---|---|---:|---|---:|---:|---:|---|"]
    for run, args, history in loaded:
        early, full = _best(history[:common]), _best(history)
        if early is None or full is None:
            continue
        score, epoch, weights, figures = early
        isic = next((v for k, v in figures.items() if k.startswith("melanoma_auc[ISIC-2017_Validation")), None)
        lines.append(f"| `{run.name}` | {args.get('colour_constancy', 'none')} | {args['arch']}, "
                     f"{args['input_size']} px | {len(history)} of {args['epochs']} | {epoch} ({weights}) | "
                     f"{_f(figures.get('balanced_accuracy'))} | {_f(isic)} | {_f(score)} | "
                     f"{full[1]} ({full[2]}), {_f(full[0])} |")
    return lines


def _choices_table(choices: list[tuple[str, Path]]) -> list[str]:
    """One row per compared choice, from its `skinscan evaluate --split val --perturb` report: validation figures
    only (clean and mean over the robustness variants, decision rule and plain arg-max), and the change of each
    row's mean robust balanced accuracy from the row before."""
    if not choices:
        return []
    lines = ["| choice (validation split) | balanced accuracy | plain arg-max | mean over variants | largest drop | "
             "melanoma AUC | melanoma calls / true | change of the mean from the row above |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    before = None
    for title, path in choices:
        figures = _figures(json.loads(path.read_text()))
        mean = figures["robust_mean_ba"]
        change = "" if before is None or mean is None else f"{mean - before:+.3f}"
        lines.append(f"| {title} | {_f(figures['balanced_accuracy'])} | {_f(figures['balanced_accuracy_plain'])} | "
                     f"{_f(mean)} | {_f(figures['robust_worst_drop'])} | {_f(figures['melanoma_auc'])} | "
                     f"{figures['mel_calls'] or 'n/a'} | {change} |")
        before = mean
    return lines


def _capacity_table(path: Path | None) -> list[str]:
    """Rows of `python -m training.compare` (bundles and their mean on one run's validation split): the figures
    that decide whether a capacity step (a longer schedule, an ensemble) is kept."""
    if path is None:
        return []
    lines = ["| bundle(s) (validation split) | balanced accuracy: plain / offsets refitted | mean over variants: "
             "plain / offsets refitted | largest drop | macro AUC | melanoma AUC |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in json.loads(path.read_text()):
        lines.append(f"| {row['name']} | {_f(row['balanced_accuracy'])} / "
                     f"{_f(row['balanced_accuracy_corrected'])} | {_f(row['score'])} / {_f(row['score_corrected'])} | "
                     f"{_f(row['worst_variant_drop'])} | {_f(row['macro_auc'])} | {_f(row['melanoma_auc'])} |")
    return lines


def render(bundle_path: Path, reports: list[tuple[str, str, Path]], notes: str = "",
           previous: list[tuple[str, Path]] | None = None, runs: list[Path] | None = None,
           choices: list[tuple[str, Path]] | None = None, capacity: Path | None = None) -> str:
    """Return the model card text for a bundle, its held-out (title, command, report path) evaluations, the
    previous model's reports of the same titles and the training runs that were compared."""
    bundle = load_bundle(bundle_path)
    meta = bundle.meta
    train = meta.get("training", {})
    cfg = train.get("config", {})
    data = meta.get("training_data", {})
    val = meta.get("metrics", {}).get("validation", {})
    loaded = [(title, command, json.loads(path.read_text()), path) for title, command, path in reports]
    tests = [(title, _figures(report)) for title, _, report, _ in loaded]
    prev_reports = {title: json.loads(path.read_text()) for title, path in previous or []}
    prev_figures = {title: _figures(r) for title, r in prev_reports.items()}
    prev_version = next((r.get("model_version") for r in prev_reports.values()), None)
    referral = meta.get("referral") or {}
    colour = (meta.get("colour_constancy") or {}).get("method", "none")
    init = meta.get("initialisation") or ("warm start" if cfg.get("pretrained") else "random initialisation")
    counts = data.get("counts") or {}

    out = [
        f"# Model card: {meta.get('name')} `{bundle.version}`", "",
        "> **Decision support, not a diagnosis.** This model is for research and to help clinicians prioritise "
        "review. It is not a medical device, is not clinically validated, and must never be used to rule out "
        "skin cancer.", "",
        "## Held-out test figures", "",
        "Computed once, after the model was chosen on validation data; no test image, lesion or known duplicate was "
        "trained on or used for the choice.", "",
    ] + _headline_table(tests, prev_figures, prev_version) + [
        "", "### Against the targets set for this model", "",
    ] + _targets(dict(tests)) + [
        "",
        "## Model", "",
        f"- Architecture: `{meta['architecture']}`"
        + (" (timm)" if meta["architecture"].startswith("tf_") else " (torchvision)")
        + f", initialised from {init}.",
        (f"- Input: RGB, the whole image resized to {bundle.input_size} x {bundle.input_size} "
         f"({meta.get('interpolation', 'bilinear')}; its aspect ratio is not kept, so a 4:3 file and the same file "
         "already squashed to a square give the same input), " if bundle.resize_mode == "squash" else
         f"- Input: RGB, shorter side resized to {bundle.resize_size} px ({meta.get('interpolation', 'bilinear')}), ")
        + (f"{colour.replace('_', ' ')} colour constancy (Minkowski p = "
           f"{(meta.get('colour_constancy') or {}).get('power')}), " if colour != "none" else "")
        + ("" if bundle.resize_mode == "squash" else f"centre crop {bundle.input_size} x {bundle.input_size}, ")
        + "normalised with mean "
        f"{[round(x, 3) for x in meta['mean']]} and std {[round(x, 3) for x in meta['std']]} (all in the bundle; "
        "scoring applies exactly the same steps).",
        f"- Output: probabilities of {len(bundle.classes)} classes ({', '.join(bundle.classes)}), temperature-scaled "
        f"(T = {bundle.temperature:.3f}, fitted on the validation split). Malignancy score = sum of "
        f"{', '.join(bundle.malignant_classes)}.",
        "- Decision (the class a result names): "
        + (f"arg-max of the log-probabilities plus per-class offsets "
           f"{dict(zip(bundle.classes, [round(float(v), 2) for v in bundle.logit_offsets], strict=True))}, fitted "
           "on the validation split and its robustness variants to maximise balanced accuracy (class-prior "
           "correction; the probabilities themselves stay calibrated). The tables give plain arg-max beside it."
           if bundle.logit_offsets.any() else "the class of highest probability."),
        f"- Referral flag: malignancy score >= {referral.get('malignancy_threshold', 0):.3f} (the default operating "
        "point, chosen on " + str(referral.get("chosen_on", "the validation split"))
        + (f" for malignant sensitivity >= {referral['target_malignant_sensitivity']}"
           if "target_malignant_sensitivity" in referral else "")
        + f"), or top probability < {referral.get('uncertain_below')} (the model is unsure). A deployment picks "
        "another point with `SKINSCAN_REFERRAL_SENSITIVITY`.",
        f"- Bundle files: {', '.join(f'`{n}`' for n in meta.get('checksums', {}))}, `metadata.json`, `splits.csv`.",
        "",
    ]
    points = _operating_points(meta, [(title, report) for title, _, report, _ in loaded])
    if points:
        out += ["### Referral operating points", "",
                "Thresholds chosen on the validation split; sensitivity and flag rates on the held-out test sets at "
                "the same thresholds (malignancy rule alone, without the unsure rule; ISIC 2017's only malignant "
                "class is melanoma).", ""] + points + [""]
    out += [
        "## Training", "",
        f"- {len(train.get('history', []))} of {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, AdamW "
        f"(head lr {cfg.get('lr')}, backbone lr x {cfg.get('backbone_lr_scale', 1.0)}, weight decay "
        f"{cfg.get('weight_decay')}, no decay on norms and biases), {cfg.get('warmup_epochs')} warm-up epochs then "
        f"cosine decay, label smoothing {cfg.get('label_smoothing')}, weight EMA decay {cfg.get('ema_decay', 0)}.",
        "- Class imbalance: every source sampled at one common prior (square root of the main set's class "
        "frequencies; ISIC 2017's melanoma, keratosis and \"neither\" at that prior's shares), so which archive an "
        "image comes from says nothing about its label; loss weights 1/sqrt(frequency); extra collections keep "
        f"x {cfg.get('extra_weight', 1.0)} their share per image."
        if train.get("class_prior") else
        "- Class imbalance: square-root-frequency sampling and loss weights; extra collections sampled x "
        f"{cfg.get('extra_weight', 1.0)} per image.",
        "- Augmentation: random resized crops (scale 0.35-1) that squash and stretch up to "
        f"{cfg.get('aspect_range', 1.33)}:1 either way, occasional zoom-out and black-bordered shrinks along one "
        "axis (square padding), a dermoscope's dark rim, flips, 90-degree and small free rotations, white balance "
        "(about +-2,000 K) and exposure (-1 to +0.9 stops) in linear light, contrast/saturation/hue jitter, lower "
        "resolution, JPEG quality 25-90 and blur (`train_transform` in training/train.py, `RandomAppearance` in "
        "training/perturb.py)." if cfg.get("aspect_range") else
        "- Augmentation: random resized crops (scale 0.35-1), occasional zoom-out (dark dermoscope borders), "
        "horizontal and vertical flips, 90-degree and small free rotations, brightness/contrast/saturation/hue "
        "jitter and occasional blur (`train_transform` in training/train.py).",
        "- ISIC 2017 labels supervise only what they say: melanoma -> mel, seborrheic keratosis -> bkl, and "
        "\"neither\" as a partial label (any class but mel and bkl), not as nevus.",
        f"- Model choice: {train.get('selection', 'validation balanced accuracy')}; best epoch "
        f"{train.get('best_epoch')} ({train.get('best_weights', 'raw')} weights); seed {cfg.get('seed')}; "
        f"{train.get('device', 'cpu')}, torch {train.get('torch')}.",
        "",
    ]
    table = _choices_table(choices or [])
    if table:
        out += ["### Choices and their validation effect", "",
                "Each row is `skinscan evaluate --split val --perturb` on the HAM10000 validation split (never "
                "trained on; the test split was not looked at for any choice). \"balanced accuracy\" is by the "
                "bundle's decision rule, \"plain arg-max\" without its class-prior offsets; the mean and the "
                "largest drop are over the robustness variants, the figure model choice used.", ""] + table + [""]
    table = _capacity_table(capacity)
    if table:
        out += ["### Capacity steps", "",
                "Each bundle, and the mean of their calibrated probabilities (an ensemble), scored by "
                "`python -m training.compare` on the same validation split and robustness variants; \"offsets "
                "refitted\" fits each row's class-prior offsets on these same images (in-sample, so optimistic). A "
                "step is kept when it gains at least 0.01 of the mean over variants.", ""] + table + [""]
    table = _runs_table(runs or [])
    if table:
        out += ["### Runs compared", "",
                "Runs compared on validation only (HAM10000 validation split and ISIC 2017's official validation "
                "split), with everything but the named choice equal; the best one was continued and ships.",
                ""] + table + [""]
    out += ["## Data and licence", ""]
    for name, c in counts.items():
        parts = [f"{c.get(sp, 0):,} {label}" for sp, label in (("train", "training"), ("val", "validation"),
                                                                ("test", "test")) if sp in c]
        out.append(f"- `{name}`: {', '.join(parts)} images; licence {_licence(name)}.")
    if data.get("split_fractions"):
        fr = data["split_fractions"]
        out.append(f"- Split of {data.get('dataset')}: {data.get('split')}, seed {data.get('seed', cfg.get('seed'))}, "
                   f"fractions {1 - fr['val'] - fr['test']:.2f} / {fr['val']:.2f} / {fr['test']:.2f} "
                   "(train / validation / test)" + (f", reused from `{Path(cfg['splits']).name}`"
                                                     if cfg.get("splits") else "") + ".")
    out += _split_facts(bundle_path)
    if data.get("extra_validation_sets"):
        names = ", ".join(f"`{n}`" for n in data["extra_validation_sets"])
        out.append(f"- Used for model choice, never trained on: {names}.")
    if data.get("held_out_sets"):
        out.append(f"- Held out (their images and duplicates of them never trained on): "
                   f"{', '.join(f'`{n}`' for n in data['held_out_sets'])}.")
    if any(_licence(n) == "CC BY-NC-SA 4.0" for n in counts):
        out.append("- HAM10000 is CC BY-NC-SA 4.0: the model inherits its non-commercial, share-alike terms.")
    out += [
        "",
        "## Validation (model choice and calibration only, not a test)", "",
        f"balanced accuracy {_f(val.get('balanced_accuracy'))}, macro AUC {_f(val.get('macro_auc'))}, melanoma AUC "
        f"{_f(val.get('melanoma_auc'))}"
        + "".join(f", {k.split('[')[1].rstrip(']').replace('_Part3_GroundTruth.csv', '')} melanoma AUC {_f(v)}"
                  for k, v in val.items() if k.startswith("melanoma_auc["))
        + f", ECE {_f(val.get('ece_before_calibration'))} before and {_f(val.get('ece'))} after temperature scaling"
        + (f"; balanced accuracy with the decision offsets {_f(val['balanced_accuracy_corrected'])}"
           if "balanced_accuracy_corrected" in val else "") + ".",
        "",
    ]
    for title, command, report, path in loaded:
        out += [f"## {title}", "", f"`{command}`", ""]
        if not report.get("melanoma_only"):
            out += _per_class_table(report) + [""]
        else:
            out += ["Labels tell melanoma and seborrheic keratosis from \"anything else\", so only the melanoma and "
                    "malignancy figures above apply.", ""]
        stem = path.with_suffix("").as_posix()
        out += [f"Plots: [confusion matrix]({stem}_confusion.png), [ROC curves]({stem}_roc.png), "
                f"[reliability diagram]({stem}_reliability.png)"
                + (f", [robustness]({stem}_robustness.png)" if report.get("robustness") else "") + ".", ""]
        robust = _robustness_table(report, prev_reports.get(title))
        if robust:
            out += ["Robustness: the same images as other clinics' copies of them differ (`--perturb`); balanced "
                    "accuracy by the bundle's decision rule, its change from the images as they are, and the "
                    "counts of predicted classes against the true ones.", ""] + robust + [""]
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
    parser.add_argument("--report", action="append", default=[],
                        help="TITLE::COMMAND::PATH of a held-out `skinscan evaluate` report")
    parser.add_argument("--previous", action="append", default=[],
                        help="TITLE::PATH of the previous model's report on the same test set")
    parser.add_argument("--run", action="append", default=[], type=Path,
                        help="a compared run folder (args.json, history.jsonl)")
    parser.add_argument("--choice", action="append", default=[],
                        help="TITLE::PATH of a validation-split `skinscan evaluate --perturb` report of one choice")
    parser.add_argument("--capacity", type=Path, help="JSON rows of `python -m training.compare` (capacity steps)")
    parser.add_argument("--notes", type=Path, required=True, help="markdown file: known limits and biases")
    parser.add_argument("--out", type=Path, default=Path("MODEL_CARD.md"))
    args = parser.parse_args(argv)
    reports = [(t, c, Path(p)) for t, c, p in (r.split("::", 2) for r in args.report)]
    previous = [(t, Path(p)) for t, p in (r.split("::", 1) for r in args.previous)]
    choices = [(t, Path(p)) for t, p in (c.split("::", 1) for c in args.choice)]
    args.out.write_text(render(args.model, reports, args.notes.read_text(), previous, args.run, choices,
                           args.capacity))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
