"""Batch inference on a model bundle with ONNX Runtime (CPU) or PyTorch (CPU or CUDA), with calibration.

PyTorch is imported only by the torch backend (the `train`/`gpu` extras): ONNX Runtime scoring runs without it."""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from skinscan.model.bundle import FEATURES_OUTPUT, ONNX_FILE, Bundle, BundleError, find_target_layer, load_bundle

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")
# Images per forward pass by backend and device, from benchmarks/throughput.py (section 1): on a CPU, small
# batches keep one thread's activations in cache; a GPU needs large ones to fill the card.
BATCH_SIZES = {"onnx": 8, "torch": 16, "cuda": 256}


def available_cores() -> int:
    """Return the CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


class CpuDevice(NamedTuple):
    """The device of the ONNX backend, shaped like a torch.device (`.type`) without importing PyTorch."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Return row-wise softmax of logits / temperature (training.calibration's, without its PyTorch import)."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def torch_installed() -> bool:
    """Whether PyTorch can be imported (the `train` or `gpu` extra)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _cuda_available() -> bool:
    """Return True when PyTorch is installed and sees a CUDA GPU (asked when a predictor is built, not at import)."""
    if not torch_installed():
        return False
    import torch

    return torch.cuda.is_available()


class Predictor:
    """Run a bundle's network on preprocessed N x 3 x S x S float32 batches into logits or probabilities."""

    def __init__(
        self, bundle: Bundle, backend: str = "onnx", device: str = "cpu", threads: int | None = None
    ) -> None:
        if backend not in ("onnx", "torch"):
            raise ValueError(f"backend must be 'onnx' or 'torch', not {backend!r}")
        self.bundle = bundle
        self.backend = backend
        self.threads = threads
        self._session: Any = None
        self._input_name = ""
        self._features = False  # the ONNX model's second output / the torch model's hook: the last feature map
        self._captured: list[torch.Tensor] = []
        self._model: torch.nn.Module | None = None
        self._amp: torch.dtype | None = None
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        self._scale: np.ndarray | None = None
        self._bias: np.ndarray | None = None
        self.device: Any
        if backend == "onnx":
            if device != "cpu":
                raise ValueError(f"the ONNX backend runs on the CPU only, not on {device!r}")
            self.device = CpuDevice()
            self._init_onnx()
        else:
            if not torch_installed():
                raise BundleError("the torch backend needs PyTorch: pip install 'skinscan[train]' (or [gpu])")
            import torch

            if device == "auto":
                device = "cuda" if _cuda_available() else "cpu"
            self.device = torch.device(device)
            self._init_torch()
        log.info("predictor for %s: backend %s on %s%s", bundle.version, backend, self.device,
                 f" (autocast {self._amp})" if self._amp is not None else "")

    def _init_onnx(self) -> None:
        """Open an ONNX Runtime CPU session on the bundle's model.onnx."""
        import onnxruntime as ort

        path = self.bundle.path / ONNX_FILE
        if not path.is_file():
            raise BundleError(f"bundle {self.bundle.path} has no {ONNX_FILE}; use the torch backend")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        # Idle compute threads sleep instead of spinning: the cores are shared with decode threads and with
        # the worker's other processes, and spinning threads take their time (throughput collapses).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_name = self._session.get_inputs()[0].name
        outputs = [o.name for o in self._session.get_outputs()]
        self._features = self.bundle.has_heatmap_output and outputs[1:2] == [FEATURES_OUTPUT]

    def _init_torch(self) -> None:
        """Build the eager model on the device, channels-last; autocast on CUDA, threads (process-wide) on CPU."""
        import torch

        if self.device.type == "cuda":
            if not _cuda_available():
                raise ValueError("device 'cuda' was asked for but PyTorch sees no GPU")
            self._amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            torch.backends.cudnn.benchmark = True  # batches have a few fixed shapes: pick the fastest kernels
        elif self.threads:
            torch.set_num_threads(int(self.threads))
        self._model = self.bundle.torch_model().to(self.device, memory_format=torch.channels_last)
        if self.bundle.has_heatmap_output:  # the same feature map the ONNX model outputs, for the same heat maps
            find_target_layer(self._model).register_forward_hook(lambda _m, _i, out: self._captured.append(out))
            self._features = True

    @property
    def classes(self) -> list[str]:
        """Class names in output order."""
        return self.bundle.classes

    @property
    def batch_size(self) -> int:
        """The batch size that measured fastest for this backend and device."""
        return BATCH_SIZES["cuda" if self.device.type == "cuda" else self.backend]

    @property
    def temperature(self) -> float:
        """Calibration temperature applied by predict."""
        return self.bundle.temperature

    def _check(self, batch: np.ndarray) -> np.ndarray:
        """Validate a batch's shape and return it as contiguous float32."""
        size = self.bundle.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise ValueError(f"expected a N x 3 x {size} x {size} batch, got shape {tuple(batch.shape)}")
        return np.ascontiguousarray(batch, dtype=np.float32)

    @property
    def has_features(self) -> bool:
        """Whether predictions come with the last feature map (for heat maps without a PyTorch task)."""
        return self._features

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """Return the N x C float32 logits of a preprocessed N x 3 x S x S float32 batch."""
        return self.predict_logits_features(batch)[0]

    def predict_logits_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return the N x C float32 logits and, when the bundle has them, the N x K x h x w feature maps."""
        batch = self._check(batch)
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32), None
        if self._session is not None:
            outs = self._session.run(None, {self._input_name: batch})
            feats = np.asarray(outs[1], dtype=np.float32) if self._features else None
            return np.asarray(outs[0], dtype=np.float32), feats
        import torch

        assert self._model is not None
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the torch model (autocast on CUDA) on a device batch; logits and the hooked feature map."""
        import torch

        assert self._model is not None
        self._captured.clear()
        with torch.autocast(self.device.type, dtype=self._amp) if self._amp is not None else nullcontext():
            logits = self._model(x)
        feats = self._captured.pop().float().cpu().numpy() if self._features and self._captured else None
        self._captured.clear()
        return logits.float().cpu().numpy(), feats

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Return N x C calibrated probabilities, softmax(logits / temperature)."""
        return softmax(self.predict_logits(batch).astype(np.float64), self.temperature).astype(np.float32)

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Return N x C calibrated probabilities of an N x S x S x 3 uint8 batch of resized, cropped images."""
        return self.predict_images_features(images)[0]

    def predict_images_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return N x C calibrated probabilities of an N x S x S x 3 uint8 batch of resized, cropped images, and
        the N x K x h x w last feature maps when the bundle has them (None otherwise).

        On a GPU the uint8 batch goes over (a quarter of the float32 bytes) from pinned memory without
        blocking, and is normalised there; elsewhere the bundle normalises it on the CPU.
        """
        size = self.bundle.input_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise ValueError(f"expected a N x {size} x {size} x 3 uint8 batch, got {images.dtype} {images.shape}")
        if self.device.type != "cuda" or len(images) == 0:
            logits, feats = self.predict_logits_features(self._normalize_cpu(images))
        else:
            import torch

            with torch.inference_mode():
                logits, feats = self._torch_forward(self._device_batch(images))
        return softmax(logits.astype(np.float64), self.temperature).astype(np.float32), feats

    def _normalize_cpu(self, images: np.ndarray) -> np.ndarray:
        """The bundle's normalisation, as one multiply-add written straight into N x 3 x S x S (12x faster)."""
        if self._scale is None or self._bias is None:
            mean = np.asarray(self.bundle.meta["mean"], dtype=np.float32) * 255.0
            std = np.asarray(self.bundle.meta["std"], dtype=np.float32) * 255.0
            self._scale = (1.0 / std).astype(np.float32)[:, None, None]
            self._bias = (-mean / std).astype(np.float32)[:, None, None]
        out = np.empty((images.shape[0], 3, images.shape[1], images.shape[2]), dtype=np.float32)
        np.multiply(images.transpose(0, 3, 1, 2), self._scale, out=out, casting="unsafe")
        out += self._bias
        return out

    def _device_batch(self, images: np.ndarray) -> torch.Tensor:
        """Move a uint8 N x S x S x 3 batch to the device (pinned, non-blocking) and normalise it there."""
        import torch

        if self._mean is None or self._std is None:
            self._mean = torch.tensor(self.bundle.meta["mean"], device=self.device).view(1, 3, 1, 1) * 255.0
            self._std = torch.tensor(self.bundle.meta["std"], device=self.device).view(1, 3, 1, 1) * 255.0
        host = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            host = host.pin_memory()
        # N x H x W x C permuted to N x C x H x W is already channels-last in memory.
        x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)


def load_predictor(
    bundle_or_path: Bundle | str | Path,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> Predictor:
    """Build a Predictor; "auto": torch on a GPU, else ONNX Runtime given model.onnx, else torch (if installed)."""
    bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else load_bundle(bundle_or_path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], not {device!r}")
    if backend == "auto":
        if device.startswith("cuda") or (device == "auto" and _cuda_available()):
            backend = "torch"
        elif (bundle.path / ONNX_FILE).is_file():
            backend = "onnx"
        elif torch_installed():
            backend = "torch"
        else:
            raise BundleError(f"bundle {bundle.path} has no {ONNX_FILE} and PyTorch is not installed "
                              "(pip install 'skinscan[train]' to score it with PyTorch)")
    if device == "auto":
        device = "cuda" if backend == "torch" and _cuda_available() else "cpu"
    return Predictor(bundle, backend=backend, device=device, threads=threads)
