"""`python -m training.compare`: bundles and their mean scored on a run's validation split and variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training.compare import compare, main


def test_compare_reproduces_the_bundles_validation_figures_and_averages_members(smoke_run: Path,
                                                                                tmp_path: Path) -> None:
    """A bundle compared on its own run gives the validation figures written into it; an ensemble of a bundle
    with its copy is that bundle; the table is written as JSON."""
    bundle = smoke_run / "bundle"
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    out = tmp_path / "compare.json"
    main(["--run", str(smoke_run), "--out", str(out), "--threads", "1", str(bundle), str(copy)])
    rows = json.loads(out.read_text())
    assert len(rows) == 3 and rows[2]["name"] == "smoke-test + smoke-test"
    validation = json.loads((bundle / "metadata.json").read_text())["metrics"]["validation"]
    assert rows[0]["balanced_accuracy"] == pytest.approx(validation["balanced_accuracy"], abs=1e-6)
    assert rows[0]["balanced_accuracy_corrected"] == pytest.approx(validation["balanced_accuracy_corrected"],
                                                                   abs=1e-6)
    assert rows[0]["melanoma_auc"] == pytest.approx(validation["melanoma_auc"], abs=1e-6)
    for key in ("balanced_accuracy", "score", "score_corrected", "macro_auc"):
        assert rows[1][key] == pytest.approx(rows[0][key]) and rows[2][key] == pytest.approx(rows[0][key])


def test_compare_refuses_bundles_of_another_input_size(smoke_run: Path, tmp_path: Path) -> None:
    """A bundle of another input size cannot be scored on the run's validation images: a clear error."""
    other = tmp_path / "other"
    shutil.copytree(smoke_run / "bundle", other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["input_size"] += 32
    (other / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="input"):
        compare(smoke_run, [smoke_run / "bundle", other])
