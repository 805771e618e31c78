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

from skinscan.model.bundle import BundleError, referral_threshold
from skinscan.model.health import record_unusable
from skinscan.model.registry import production_model
from skinscan.model.store import BundleRef, BundleStoreError, local_bundle
from skinscan.storage import StorageError
from skinscan.tables import ModelVersion
from web.context import db, settings
from web.pages.auth import login_required
from web.pages.common import page_blueprint

log = logging.getLogger(__name__)
bp = page_blueprint("model")

MODEL_CARD = "MODEL_CARD.md"
PLOT_NAME = re.compile(r"^[A-Za-z0-9_.-]+_(confusion|roc|reliability|robustness)\.png$")
ALIGN_STYLE = re.compile(r'style="text-align: (left|right|center);"')
PLOT_TITLES = {"confusion": "Confusion matrix", "roc": "ROC curves", "reliability": "Reliability (calibration)",
               "robustness": "Robustness to other clinics' image differences"}


def render_markdown(text: str) -> Markup:
    """Render the model card's Markdown (headings, paragraphs, lists, tables) to HTML."""
    import markdown

    html = markdown.markdown(text, extensions=["tables", "sane_lists", "toc"], output_format="html",
                             extension_configs={"toc": {"baselevel": 3}})  # '#' sits below the page's h2
    # Column alignment comes out as inline styles, which the Content Security Policy (rightly) blocks: use classes.
    html = ALIGN_STYLE.sub(lambda m: f'class="align-{m.group(1)}"', html)
    return Markup(sanitize_card(html))


# What a model card's Markdown may become: text structure, tables, links and images; no forms, frames, scripts,
# styles or event attributes. The card travels inside a bundle anyone registering a model wrote.
CARD_TAGS = {"h1", "h2", "h3", "h4", "h5", "h6", "p", "br", "hr", "blockquote", "pre", "code", "em", "strong", "b",
             "i", "del", "sup", "sub", "ul", "ol", "li", "dl", "dt", "dd", "table", "caption", "thead", "tbody",
             "tr", "th", "td", "a", "img", "abbr", "span", "div"}
CARD_ATTRIBUTES = {"*": {"id", "title"}, "a": {"href"}, "img": {"src", "alt", "width", "height"},
                   "th": {"class", "colspan", "rowspan", "scope"}, "td": {"class", "colspan", "rowspan"},
                   "ol": {"start"}}


def sanitize_card(html: str) -> str:
    """Keep only the model card's allowed tags and attributes (nh3, the Ammonia sanitiser); links get
    rel="noopener noreferrer" and only http(s), mailto or relative addresses."""
    import nh3

    return nh3.clean(html, tags=CARD_TAGS, attributes=CARD_ATTRIBUTES, url_schemes={"http", "https", "mailto"},
                     link_rel="noopener noreferrer")


def bundle_folder(row: ModelVersion) -> Path | None:
    """The model's bundle on this machine: fetched from object storage into the local cache on first use and
    verified against its checksum (a version registered before bundles were stored: its folder). None, logged,
    when it cannot be had: the page then shows what the registry holds, never another model's card."""
    ref = BundleRef(row.version, row.storage_prefix, row.bundle_checksum, row.path)
    try:
        folder = local_bundle(ref, settings())
    except (BundleStoreError, StorageError) as exc:
        log.error("the bundle of model %s cannot be shown: %s", row.version, exc)
        if isinstance(exc, BundleStoreError):  # damaged in storage: every machine should know (jobs, /readyz)
            record_unusable(settings(), row.version, str(exc))
            db().refresh(row)
        return None
    return folder if folder.is_dir() else None


def model_card(bundle_dir: Path | None) -> Markup | None:
    """Return the model card as HTML: the MODEL_CARD.md that travels inside the bundle, if it has one."""
    if bundle_dir is not None and (bundle_dir / MODEL_CARD).is_file():
        return render_markdown((bundle_dir / MODEL_CARD).read_text(encoding="utf-8", errors="replace"))
    return None


def live_meta(row: ModelVersion, folder: Path | None) -> dict[str, Any]:
    """The bundle's own metadata.json (evaluations recorded in it included), else the row's copy."""
    try:
        if folder is not None:
            return json.loads((folder / "metadata.json").read_text())
    except (OSError, ValueError):
        pass
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
    folder = bundle_folder(row)
    meta = live_meta(row, folder)
    return render_template(
        "model.html", model=row, meta=meta, versions=versions, card=model_card(folder),
        plots=plots(folder) if folder is not None else [], bundle_missing=folder is None,
        validation=(meta.get("metrics") or {}).get("validation") or {},
        referral_sensitivity=settings().referral_sensitivity,
        referral_threshold=_threshold(meta),
        evaluations=(meta.get("metrics") or {}).get("evaluations") or {},
    )


@bp.get("/model/plots/<name>")
@login_required
def plot(name: str):  # type: ignore[no-untyped-def]
    """A plot PNG from the production model's bundle (only *_confusion/_roc/_reliability/_robustness.png)."""
    row = production_model(db())
    if row is None or not PLOT_NAME.match(name):
        abort(404)
    folder = bundle_folder(row)
    path = folder / name if folder is not None else None
    if path is None or not path.is_file():
        abort(404)
    return send_file(path, mimetype="image/png", max_age=3600)
