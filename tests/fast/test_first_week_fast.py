"""Small things a clinic trips over in its first week: label-file messages, number formatting on the pages."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from realservices import Api
from test_pages_fast import make_user, sign_in

from skinscan.labels import LabelFileError, parse_ground_truth


def test_a_semicolon_separated_labels_file_is_named_as_such() -> None:
    with pytest.raises(LabelFileError) as info:
        parse_ground_truth("image_id;dx\nISIC_1;mel\n")
    assert str(info.value).startswith("line 1: the columns are separated by ';'")
    assert "with ',' between columns" in str(info.value)


def test_a_bad_labels_file_names_its_line_once(api: Api, jpeg: Any) -> None:
    """The answer's message names the line once, and its detail carries the line apart from the reason (a page
    that writes "line N: reason" no longer says "line 1: line 1:")."""
    resp = api.submit([("ISIC_1.jpg", jpeg())], labels=b"image_id;dx\nISIC_1;mel\n")
    body = resp.get_json()
    assert resp.status_code == 400 and body["error"].count("line 1") == 1
    assert body["details"] == [{"line": 1, "error": body["details"][0]["error"]}]
    assert not body["details"][0]["error"].startswith("line ")
    assert "separated by ';'" in body["details"][0]["error"]


def test_pages_write_counts_as_the_command_line_does(app: Flask, settings: Any) -> None:
    """1,500 on the jobs list and the job page, as `skinscan submit` writes it (not 1500)."""
    from skinscan.db import session_scope
    from skinscan.tables import Job

    clinic_id, _, email = make_user(settings)
    with session_scope(settings) as session:
        job = Job(clinic_id=clinic_id, status="done", total=1502, scored=1500, failed=2, refused=0, name="Big batch")
        session.add(job)
        session.flush()
        job_id = job.id
    client = app.test_client()
    assert sign_in(client, email).status_code in (200, 302)
    listing = client.get("/jobs").text
    assert '<td class="num" data-role="total">1,502</td>' in listing
    assert '<td class="num" data-role="scored">1,500</td>' in listing
    page = client.get(f"/jobs/{job_id}").text
    assert 'data-count="scored">1,500<' in page and 'data-count="images">1,502<' in page
    assert "1,500 scored, 2 could not be scored" in " ".join(page.split())
