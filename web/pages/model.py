"""The model page: the version in service, its model card, validation and evaluation figures, and plots."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from flask import abort, render_template, send_file
from markupsafe import Markup
from sqlalchemy import select

from skinscan.registry import production_model
from skinscan.tables import ModelVersion
from training.bundle import BundleError, referral_threshold
from web.context import db, settings
from web.pages.auth import login_required
from web.pages.common import page_blueprint

log = logging.getLogger(__name__)
bp = page_blueprint("model")

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_CARD = "MODEL_CARD.md"
PLOT_NAME = re.compile(r"^[A-Za-z0-9_.-]+_(confusion|roc|reliability)\.png$")
ALIGN_STYLE = re.compile(r'style="text-align: (left|right|center);"')
PLOT_TITLES = {"confusion": "Confusion matrix", "roc": "ROC curves", "reliability": "Reliability (calibration)"}


def render_markdown(text: str) -> Markup:
    """Render the model card's Markdown (headings, paragraphs, lists, tables) to HTML."""
    import markdown

    html = markdown.markdown(text, extensions=["tables", "sane_lists", "toc"], output_format="html",
                             extension_configs={"toc": {"baselevel": 3}})  # '#' sits below the page's h2
    # Column alignment comes out as inline styles, which the Content Security Policy (rightly) blocks: use classes.
    html = ALIGN_STYLE.sub(lambda m: f'class="align-{m.group(1)}"', html)
    return Markup(html)


def model_card(bundle_dir: Path | None) -> Markup | None:
    """Return the model card as HTML: the bundle's own MODEL_CARD.md, else the repository's, if present."""
    for folder in (bundle_dir, REPO_ROOT):
        if folder is not None and (folder / MODEL_CARD).is_file():
            return render_markdown((folder / MODEL_CARD).read_text(encoding="utf-8", errors="replace"))
    return None


def live_meta(row: ModelVersion) -> dict[str, Any]:
    """The bundle's metadata as it is on disk now (evaluations are added after registration), else the row's."""
    try:
        return json.loads((Path(row.path) / "metadata.json").read_text())
    except (OSError, ValueError):
        return dict(row.meta or {})


def plots(bundle_dir: Path) -> list[dict[str, str]]:
    """The evaluation plots in a bundle folder, grouped by evaluation, confusion/ROC/reliability order."""
    out = []
    for path in bundle_dir.glob("*.png"):
        match = PLOT_NAME.match(path.name)
        if match:
            kind = match.group(1)
            evaluation = path.name[: -len(f"_{kind}.png")]
            out.append({"name": path.name, "kind": kind, "evaluation": evaluation,
                        "title": f"{PLOT_TITLES[kind]} ({evaluation})"})
    order = list(PLOT_TITLES)
    return sorted(out, key=lambda p: (p["evaluation"], order.index(p["kind"])))


def _threshold(meta: dict[str, Any]) -> float:
    try:
        return referral_threshold(meta, settings().referral_sensitivity)
    except BundleError:
        return referral_threshold(meta)


@bp.get("/model")
@login_required
def show():  # type: ignore[no-untyped-def]
    """The model in service: what it is, how it was validated, when it refers, and its model card."""
    session = db()
    row = production_model(session)
    versions = list(session.scalars(select(ModelVersion).order_by(ModelVersion.registered_at.desc()).limit(20)))
    if row is None:
        return render_template("model.html", model=None, versions=versions, card=model_card(None))
    folder = Path(row.path)
    meta = live_meta(row)
    return render_template(
        "model.html", model=row, meta=meta, versions=versions, card=model_card(folder),
        plots=plots(folder) if folder.is_dir() else [],
        validation=(meta.get("metrics") or {}).get("validation") or {},
        referral_sensitivity=settings().referral_sensitivity,
        referral_threshold=_threshold(meta),
        evaluations=(meta.get("metrics") or {}).get("evaluations") or {},
    )


@bp.get("/model/plots/<name>")
@login_required
def plot(name: str):  # type: ignore[no-untyped-def]
    """A plot PNG from the production model's bundle folder (only *_confusion/_roc/_reliability.png)."""
    row = production_model(db())
    if row is None or not PLOT_NAME.match(name):
        abort(404)
    path = Path(row.path) / name
    if not path.is_file():
        abort(404)
    return send_file(path, mimetype="image/png", max_age=3600)
