"""Section 5's baseline: the design most single-image apps use, one HTTP request per image, scored synchronously.

POST /predict with the image bytes as the body; the request decodes it, preprocesses it and runs the network on
a batch of one, then answers the probabilities. No queue, no storage, no database. Run it as production web
runs: `gunicorn --workers 2 --threads 4 --chdir benchmarks 'baseline_app:create_app()'` with SKINSCAN_MODEL set
(SKINSCAN_BACKEND: torch, the usual eager PyTorch, or onnx; SKINSCAN_THREADS: 0 leaves the library default).
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request

from skinscan.imaging import ImageError, decode_rgb
from skinscan.model.bundle import load_bundle
from skinscan.model.predictor import load_predictor
from skinscan.settings import load_settings

log = logging.getLogger(__name__)


def create_app() -> Flask:
    """Load the bundle named by SKINSCAN_MODEL once per process and serve POST /predict."""
    settings = load_settings()
    if settings.model_path is None:
        raise SystemExit("set SKINSCAN_MODEL to the bundle folder to serve")
    bundle = load_bundle(settings.model_path)
    backend = "torch" if settings.backend == "auto" else settings.backend
    predictor = load_predictor(bundle, backend=backend, device="cpu", threads=settings.threads or None)
    app = Flask(__name__)

    @app.post("/predict")
    def predict():  # type: ignore[no-untyped-def]
        """Score the image in the request body."""
        try:
            img = decode_rgb(request.get_data(), draft_size=bundle.resize_size)
        except ImageError as exc:
            return jsonify({"error": str(exc)}), 400
        probs = predictor.predict(bundle.preprocess(img)[None])[0]
        return jsonify({c: round(float(p), 6) for c, p in zip(bundle.classes, probs, strict=True)})

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        """Liveness."""
        return jsonify({"status": "ok"})

    log.info("baseline app: %s with %s", bundle.version, predictor.backend)
    return app
