"""Grad-CAM without services: which layer is explained for each architecture a bundle may hold, that the
explanation runs on it, and that a heatmap is requested from the workers once, not on every page view."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastweb import MODEL_VERSION, SentTasks
from realservices import Api


def _torchvision(arch: str) -> torch.nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=7)


def _timm(arch: str) -> torch.nn.Module:
    from training.export import create_model

    return create_model(arch, 7)


@pytest.mark.parametrize(("build", "arch", "expected"), [
    (_torchvision, "resnet18", lambda m: m.layer4[-1]),
    (_torchvision, "mobilenet_v3_small", lambda m: m.features[-1]),
    (_torchvision, "regnet_y_400mf", lambda m: m.trunk_output[-1]),
    (_torchvision, "efficientnet_b0", lambda m: m.features[-1]),
    # timm's EfficientNet-Lite ends conv_head -> bn2 (BatchNorm + ReLU6) -> pooling: the rectified output.
    (_timm, "tf_efficientnet_lite0", lambda m: m.bn2),
])
def test_target_layer_is_the_last_block_before_pooling(build: Callable[[str], torch.nn.Module], arch: str,
                                                       expected: Callable[[Any], torch.nn.Module]) -> None:
    """The explained layer is the last convolutional block (with its own norm and activation) before pooling."""
    from skinscan.model.bundle import find_target_layer

    model = build(arch)
    assert find_target_layer(model) is expected(model)


def test_target_layer_of_a_plain_stack_and_of_no_cnn() -> None:
    """A custom net: the last conv block's trailing ReLU; a net without any convolution cannot be explained."""
    from skinscan.model.bundle import find_target_layer

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    act = torch.nn.ReLU()
    model = torch.nn.Sequential()
    model.add_module("body", conv)
    model.add_module("act", act)
    model.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", torch.nn.Flatten())
    model.add_module("head", torch.nn.Linear(4, 7))
    assert find_target_layer(model) is act
    assert find_target_layer(torch.nn.Sequential(conv, torch.nn.Flatten())) is conv[-1]
    with pytest.raises(ValueError, match="no convolutional layer"):
        find_target_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7)))


def test_gradcam_runs_on_the_chosen_layer_of_efficientnet_lite() -> None:
    """Grad-CAM hooks work on timm's fused BatchNorm + in-place ReLU6 and give a map over the image, not a
    constant: the layer choice is usable, not only well named."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from skinscan.model.bundle import find_target_layer

    torch.manual_seed(0)
    model = _timm("tf_efficientnet_lite0").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.enable_grad(), GradCAM(model=model, target_layers=[find_target_layer(model)]) as cam:
        mask = cam(input_tensor=x, targets=[ClassifierOutputTarget(4)])[0]
    assert mask.shape == (96, 96) and np.isfinite(mask).all()
    assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.std() > 0


def test_heatmap_is_requested_once_then_pending(api: Api, settings: Any, sent: SentTasks,
                                                jpeg: Callable[..., bytes]) -> None:
    """The first request sends one Grad-CAM task and marks it pending; asking again sends nothing while it is
    pending; a request left pending too long (a lost message) is sent again."""
    from skinscan.db import session_scope
    from skinscan.model import heatmaps as gradcam
    from skinscan.storage import get_storage
    from skinscan.tables import ImageRecord

    job_id = api.submit([("ISIC_1.jpg", jpeg())]).get_json()["id"]
    sent.calls.clear()
    with session_scope(settings) as session:
        image = session.query(ImageRecord).filter(ImageRecord.job_id == job_id).one()
        session.expunge(image)
    storage = get_storage(settings)
    assert gradcam.request_heatmap(storage, image, MODEL_VERSION, settings) == {"state": "pending"}
    assert [(c["name"], c["args"]) for c in sent.calls] == [("worker.tasks.gradcam", [image.id, MODEL_VERSION])]
    assert gradcam.request_heatmap(storage, image, MODEL_VERSION, settings) == {"state": "pending"}
    assert len(sent.calls) == 1
    state_key = gradcam.heatmap_key(image, MODEL_VERSION)[: -len(".png")] + ".state.json"
    storage.put(state_key, json.dumps({"state": "pending", "at": 0}).encode(), "application/json")
    assert gradcam.heatmap_state(storage, image, MODEL_VERSION) == {"state": "absent"}
    gradcam.request_heatmap(storage, image, MODEL_VERSION, settings)
    assert len(sent.calls) == 2
    storage.put(gradcam.heatmap_key(image, MODEL_VERSION), b"png", "image/png")
    assert gradcam.request_heatmap(storage, image, MODEL_VERSION, settings) == {"state": "ready"}
    assert len(sent.calls) == 2


@pytest.mark.parametrize(("mode", "expected"), [("squash", (384, 288)), ("crop", (384, 384))])
def test_heatmap_lies_on_what_the_network_saw(mode: str, expected: tuple[int, int]) -> None:
    """A squash-mode bundle sees the whole 4:3 image: its map is shown over the whole image at its own shape, not
    over a centre crop; a crop-mode bundle's map lies on the centre square it saw."""
    from PIL import Image as PILImage

    from skinscan.model.bundle import Bundle
    from worker.gradcam import display_crop

    bundle = Bundle(path=None, meta={"input_size": 64, "resize_size": 64, "resize_mode": mode})  # type: ignore[arg-type]
    img = PILImage.new("RGB", (400, 300))
    img.paste((255, 0, 0), (0, 0, 40, 300))  # a red band at the left edge: outside a centre square
    shown = display_crop(img, bundle, 384)
    assert shown.size == expected
    left_edge = np.asarray(shown)[:, 0]
    assert (left_edge[:, 0] > 200).all() == (mode == "squash")
