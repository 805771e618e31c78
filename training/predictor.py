"""Batch inference on a model bundle with ONNX Runtime (CPU) or PyTorch (CPU or CUDA), with calibration."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.bundle import ONNX_FILE, Bundle, BundleError, load_bundle
from training.calibration import softmax

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")


def _cuda_available() -> bool:
    """Return True when PyTorch sees a CUDA GPU (asked only when a predictor is built, never at import)."""
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
        self._model: torch.nn.Module | None = None
        self._amp: torch.dtype | None = None
        if backend == "onnx":
            if device != "cpu":
                raise ValueError(f"the ONNX backend runs on the CPU only, not on {device!r}")
            self.device = torch.device("cpu")
            self._init_onnx()
        else:
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
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_name = self._session.get_inputs()[0].name

    def _init_torch(self) -> None:
        """Build the eager model on the device, channels-last; autocast on CUDA, threads (process-wide) on CPU."""
        if self.device.type == "cuda":
            if not _cuda_available():
                raise ValueError("device 'cuda' was asked for but PyTorch sees no GPU")
            self._amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif self.threads:
            torch.set_num_threads(int(self.threads))
        self._model = self.bundle.torch_model().to(self.device, memory_format=torch.channels_last)

    @property
    def classes(self) -> list[str]:
        """Class names in output order."""
        return self.bundle.classes

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

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """Return the N x C float32 logits of a preprocessed N x 3 x S x S float32 batch."""
        batch = self._check(batch)
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        if self._session is not None:
            return np.asarray(self._session.run(None, {self._input_name: batch})[0], dtype=np.float32)
        assert self._model is not None
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            amp = self._amp is not None
            with torch.autocast(self.device.type, dtype=self._amp) if amp else nullcontext():
                logits = self._model(x)
            return logits.float().cpu().numpy()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Return N x C calibrated probabilities, softmax(logits / temperature)."""
        return softmax(self.predict_logits(batch).astype(np.float64), self.temperature).astype(np.float32)


def load_predictor(
    bundle_or_path: Bundle | str | Path,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> Predictor:
    """Build a Predictor; "auto": torch on a GPU, else ONNX Runtime given model.onnx, else torch."""
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
        else:
            backend = "torch"
    if device == "auto":
        device = "cuda" if backend == "torch" and _cuda_available() else "cpu"
    return Predictor(bundle, backend=backend, device=device, threads=threads)
