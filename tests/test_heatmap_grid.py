"""Heat maps without PyTorch: the Grad-CAM grid from the ONNX model's feature-map output and the head's weights
equals pytorch-grad-cam's GradCAM on the same layer (the layer worker.gradcam's find_target_layer picks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from skinscan.imaging import decode_rgb
from skinscan.model.bundle import FEATURES_OUTPUT, HEATMAP_HEAD_FILE, find_target_layer, load_bundle
from skinscan.model.predictor import load_predictor
from training.export import create_model, save_bundle


def _bundle_meta(architecture: str, size: int, resize_mode: str) -> dict[str, object]:
    return {"architecture": architecture, "version": f"cam-{architecture}", "input_size": size,
            "resize_size": round(size * 1.14), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "temperature": 1.3, "resize_mode": resize_mode}


@pytest.fixture(scope="module")
def lite0_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EfficientNet-Lite0 bundle written by save_bundle: the shipped model's weights when it ships one."""
    from skinscan.bundles import DEFAULT_BUNDLE_DIR

    out = tmp_path_factory.mktemp("cam") / "lite0"
    if (DEFAULT_BUNDLE_DIR / "metadata.json").is_file():
        shipped = load_bundle(DEFAULT_BUNDLE_DIR)
        meta = {k: v for k, v in shipped.meta.items() if k not in ("checksums", "heatmap")}
        save_bundle(shipped.torch_model(), out, {**meta, "resize_mode": "squash"})
    else:
        torch.manual_seed(0)
        save_bundle(create_model("tf_efficientnet_lite0", 7), out, _bundle_meta("tf_efficientnet_lite0", 160, "squash"))
    return out


def test_grid_equals_pytorch_grad_cam(lite0_bundle: Path, ham_dir: Path,
                                      pick_ham: Callable[..., list[dict[str, str]]]) -> None:
    bundle = load_bundle(lite0_bundle)
    assert bundle.has_heatmap_output and bundle.meta["heatmap"]["output"] == FEATURES_OUTPUT
    assert HEATMAP_HEAD_FILE in bundle.meta["checksums"]
    images = [bundle.resize_crop(decode_rgb((ham_dir / "images" / f"{r['image_id']}.jpg").read_bytes()))
              for r in pick_ham(4, offset=300)]
    probs, feats = load_predictor(bundle, backend="onnx", device="cpu").predict_images_features(
        np.stack([np.asarray(img) for img in images]))
    side = bundle.input_size
    assert feats is not None and feats.shape[2:] == (side // 32, side // 32)  # 5 x 5 for 160 px

    model = bundle.torch_model()  # the bundle's (float16-rounded) weights, as in the ONNX model
    layer = find_target_layer(model)
    assert bundle.meta["heatmap"]["layer"] == dict((m, n) for n, m in model.named_modules())[layer]
    x = torch.from_numpy(np.stack([bundle.normalize(np.asarray(img)[None])[0] for img in images]))
    decided = bundle.decide(probs)
    checked = lit = 0
    for i in range(len(images)):
        for cls in {int(decided[i]), (int(decided[i]) + 3) % len(bundle.classes)}:
            grid = bundle.heatmap_grid(feats[i], cls)
            targets = [ClassifierOutputTarget(cls)]
            with torch.enable_grad(), GradCAM(model=model, target_layers=[layer]) as cam:
                full = cam(input_tensor=x[i:i + 1], targets=targets)[0]
                # The library's own grid, before it scales the map to the input: its weights (mean gradients) times
                # the activations it hooked, ReLU, then its min-max scaling.
                acts = cam.activations_and_grads.activations[0].cpu().numpy()
                grads = cam.activations_and_grads.gradients[0].cpu().numpy()
                raw = cam.get_cam_image(x[i:i + 1], layer, targets, acts, grads, False)
                ref_grid = scale_cam_image(np.maximum(raw, 0))[0]
            assert grid.shape == ref_grid.shape
            np.testing.assert_allclose(grid, ref_grid, atol=1e-4, rtol=0)
            # The full-size map GradCAM returns is the grid scaled to the input by OpenCV (then rescaled to 0..1).
            np.testing.assert_allclose(scale_cam_image(cv2.resize(grid, (side, side))[None])[0], full,
                                       atol=1e-4, rtol=0)
            assert grid.min() == 0.0 and grid.max() <= 1.0
            checked += 1
            lit += grid.max() > 0.99
    assert checked >= 4 and lit >= 4  # most maps are not all zero (a class no region speaks for)


def test_a_head_that_is_not_pool_and_linear_keeps_the_pytorch_path(tmp_path: Path) -> None:
    """MobileNetV3's head has two Linear layers with an activation between: no feature output, old path."""
    bundle = save_bundle(create_model("mobilenet_v3_small", 7), tmp_path / "mnv3",
                         _bundle_meta("mobilenet_v3_small", 64, "crop"))
    assert not bundle.has_heatmap_output and "heatmap" not in bundle.meta
    predictor = load_predictor(bundle, backend="onnx", device="cpu")
    probs, feats = predictor.predict_images_features(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert feats is None and probs.shape == (2, 7) and not predictor.has_features


def test_torch_backend_gives_the_same_grid(lite0_bundle: Path) -> None:
    """A GPU worker scores with PyTorch: its hooked feature map gives the ONNX model's grid."""
    bundle = load_bundle(lite0_bundle)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (2, bundle.input_size, bundle.input_size, 3), dtype=np.uint8)
    p_onnx, f_onnx = load_predictor(bundle, backend="onnx", device="cpu").predict_images_features(images)
    p_torch, f_torch = load_predictor(bundle, backend="torch", device="cpu").predict_images_features(images)
    assert f_onnx is not None and f_torch is not None
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4)
    for i in range(2):
        np.testing.assert_allclose(bundle.heatmap_grid(f_onnx[i], 0), bundle.heatmap_grid(f_torch[i], 0), atol=1e-4)
