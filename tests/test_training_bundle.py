"""Bundle integrity checks and the Predictor: ONNX Runtime and PyTorch agree on real preprocessed images."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from skinscan.imaging import decode_rgb
from skinscan.model.bundle import METADATA_FILE, ONNX_FILE, Bundle, BundleError, load_bundle
from skinscan.model.predictor import Predictor, load_predictor
from training.calibration import softmax


@pytest.fixture()
def real_batch(
    smoke_bundle: Path, ham_dir: Path, pick_ham: Callable[..., list[dict[str, str]]]
) -> np.ndarray:
    """Eight real HAM10000 images (none used for training), preprocessed by the bundle itself."""
    bundle = load_bundle(smoke_bundle)
    rows = pick_ham(8, offset=150)
    images = [decode_rgb((ham_dir / "images" / f"{r['image_id']}.jpg").read_bytes(),
                         draft_size=bundle.resize_size) for r in rows]
    batch = np.stack([bundle.preprocess(img) for img in images])
    assert batch.shape == (8, 3, bundle.input_size, bundle.input_size) and batch.dtype == np.float32
    return batch


def test_tampered_weights_are_refused(smoke_bundle: Path) -> None:
    load_bundle(smoke_bundle)  # intact: loads
    with (smoke_bundle / "weights.pt").open("r+b") as fh:
        fh.seek(-8, 2)
        last = fh.read(8)
        fh.seek(-8, 2)
        fh.write(bytes(b ^ 0xFF for b in last))
    with pytest.raises(BundleError, match="weights.pt does not match its checksum"):
        load_bundle(smoke_bundle)
    load_bundle(smoke_bundle, verify=False)  # metadata alone still reads


def test_tampered_onnx_is_refused(smoke_bundle: Path) -> None:
    with (smoke_bundle / ONNX_FILE).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="model.onnx does not match its checksum"):
        load_predictor(smoke_bundle)


def test_incomplete_bundles_are_refused(smoke_bundle: Path, tmp_path: Path) -> None:
    (smoke_bundle / ONNX_FILE).unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        load_bundle(smoke_bundle)
    meta = json.loads((smoke_bundle / METADATA_FILE).read_text())
    del meta["mean"]
    (smoke_bundle / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="lacks mean"):
        load_bundle(smoke_bundle)
    (smoke_bundle / METADATA_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(smoke_bundle)
    (smoke_bundle / METADATA_FILE).unlink()
    with pytest.raises(BundleError, match="metadata.json is missing"):
        load_bundle(smoke_bundle)
    with pytest.raises(BundleError, match="metadata.json is missing"):
        load_predictor(tmp_path / "nowhere")


def test_onnx_and_torch_agree(smoke_bundle: Path, real_batch: np.ndarray) -> None:
    bundle = load_bundle(smoke_bundle)
    onnx = Predictor(bundle, backend="onnx", threads=1)
    eager = Predictor(bundle, backend="torch", device="cpu")
    p_onnx, p_torch = onnx.predict(real_batch), eager.predict(real_batch)
    assert p_onnx.shape == p_torch.shape == (8, len(bundle.classes))
    np.testing.assert_allclose(p_onnx.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(p_onnx, axis=0).max() > 1e-3  # the images get different outputs: the comparison means something
    assert np.abs(p_onnx - p_torch).max() < 1e-4
    assert np.abs(onnx.predict_logits(real_batch) - eager.predict_logits(real_batch)).max() < 1e-3
    # Batch composition does not change an image's result.
    np.testing.assert_allclose(onnx.predict(real_batch[3:4]), p_onnx[3:4], atol=1e-5)
    assert onnx.predict(real_batch[:0]).shape == (0, len(bundle.classes))


def test_predict_applies_the_temperature(smoke_bundle: Path, real_batch: np.ndarray) -> None:
    bundle = load_bundle(smoke_bundle)
    logits = Predictor(bundle, backend="onnx").predict_logits(real_batch).astype(np.float64)
    spread = float(np.ptp(logits, axis=1).max())
    assert spread > 0
    for temperature in (0.5 / spread, 1.0, 3.0):
        hot = Bundle(bundle.path, {**bundle.meta, "temperature": temperature})
        for backend in ("onnx", "torch"):
            probs = Predictor(hot, backend=backend, device="cpu").predict(real_batch)
            np.testing.assert_allclose(probs, softmax(logits, temperature), atol=1e-4)
    sharp = Predictor(Bundle(bundle.path, {**bundle.meta, "temperature": 0.5 / spread}), backend="onnx")
    assert np.abs(sharp.predict(real_batch) - softmax(logits)).max() > 1e-3


def test_predictor_rejects_wrong_shapes(smoke_bundle: Path) -> None:
    predictor = load_predictor(smoke_bundle, backend="onnx")
    size = predictor.bundle.input_size
    for shape in ((3, size, size), (2, size, size, 3), (2, 3, size + 8, size + 8), (2, 1, size, size)):
        with pytest.raises(ValueError, match="expected a N x 3"):
            predictor.predict(np.zeros(shape, dtype=np.float32))


def test_load_predictor_choices(smoke_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = load_predictor(smoke_bundle, threads=1)
    assert auto.backend == "onnx" and auto.device.type == "cpu"
    forced = load_predictor(str(smoke_bundle), backend="torch")
    assert forced.backend == "torch" and forced.device.type == "cpu"
    assert not any(p.is_cuda for p in forced._model.parameters())  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="no GPU"):
        load_predictor(smoke_bundle, backend="torch", device="cuda")
    with pytest.raises(ValueError, match="CPU only"):
        load_predictor(smoke_bundle, backend="onnx", device="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        load_predictor(smoke_bundle, backend="tensorrt")

    # A bundle shipped without model.onnx falls back to PyTorch.
    meta = json.loads((smoke_bundle / METADATA_FILE).read_text())
    del meta["checksums"][ONNX_FILE]
    (smoke_bundle / METADATA_FILE).write_text(json.dumps(meta))
    (smoke_bundle / ONNX_FILE).unlink()
    assert load_predictor(smoke_bundle).backend == "torch"
    with pytest.raises(BundleError, match="has no model.onnx"):
        load_predictor(smoke_bundle, backend="onnx")


def test_auto_prefers_torch_on_a_gpu(smoke_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a machine with a GPU, "auto" means PyTorch on CUDA even when model.onnx is there (CUDA not touched).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen: dict[str, str] = {}

    def fake_init(self: Predictor, bundle: Bundle, backend: str = "onnx", device: str = "cpu",
                  threads: int | None = None) -> None:
        chosen.update(backend=backend, device=device)

    monkeypatch.setattr(Predictor, "__init__", fake_init)
    load_predictor(smoke_bundle)
    assert chosen == {"backend": "torch", "device": "cuda"}


def test_importing_leaves_cuda_alone() -> None:
    import subprocess
    import sys

    code = "\n".join([
        "import torch, torch.cuda",
        "def touched(*args, **kwargs):",
        "    raise SystemExit('CUDA was queried at import time')",
        "for name in ('is_available', 'init', '_lazy_init', 'device_count', 'is_bf16_supported'):",
        "    setattr(torch.cuda, name, touched)",
        "import skinscan.bundles, skinscan.model.predictor, training.evaluate",
        "assert not torch.cuda.is_initialized()",
        "print('ok')",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
