"""GPU throughput of the SkinScan scoring path: model ceiling, compute ceiling and worker path on one CUDA GPU.

    .venv/bin/python benchmarks/gpu.py                 # on a machine with CUDA
    .venv/bin/python benchmarks/gpu.py --quick

1. model ceiling: forward passes on batches already in GPU memory, float32 and mixed precision (autocast bf16, or
   fp16 where the card has no bf16), channels-last, for each batch size; also from pinned host memory (uint8, the
   worker's path). 2. compute ceiling: JPEG bytes in memory -> decode (every core, the worker's thread pool) ->
   model, with decode-only throughput to show whether decoding keeps up; optionally nvJPEG decode on the GPU.
3. worker path: the pipeline's score_chunk on N stored images (local folder, SQLite unless DATABASE_URL names a
   database), chunk after chunk in one process, as one worker process per GPU runs it.
Exits with status 2 and says so when PyTorch sees no CUDA GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ROOT,
    BenchmarkError,
    load_images,
    machine_info,
    print_table,
    resolve_bundle,
    write_json,
)

log = logging.getLogger("benchmarks.gpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--images", type=int, default=4000, help="images for sections 2 and 3")
    p.add_argument("--batch-sizes", default="32,64,128,256,512,1024")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--chunk-size", type=int, default=512, help="images per task in the worker path")
    p.add_argument("--decode-workers", type=int, default=0, help="decode threads (0: every core)")
    p.add_argument("--nvjpeg", action="store_true", help="also measure decode with nvJPEG on the GPU")
    p.add_argument("--out", type=Path, default=ROOT / "var" / "benchmarks" / "gpu.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch_sizes, args.seconds = min(args.images, 1000), "64,256", min(args.seconds, 3.0)
    return args


def _timed(step: Any, seconds: float, per_call: int) -> float:
    """Images/s of calling step() repeatedly for about `seconds` (CUDA synchronised at both ends)."""
    import torch

    step()
    torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += per_call
    torch.cuda.synchronize()
    return round(done / (time.perf_counter() - start), 1)


def model_ceiling(bundle_path: Path, batch_sizes: list[int], seconds: float) -> dict[str, Any]:
    """Section 1: forward passes by precision and batch size; input in GPU memory, and uint8 from pinned memory."""
    import numpy as np
    import torch

    from skinscan.model.bundle import load_bundle
    from skinscan.model.predictor import load_predictor

    bundle = load_bundle(bundle_path)
    predictor = load_predictor(bundle, backend="torch", device="cuda")
    model, amp = predictor._model, predictor._amp  # noqa: SLF001 - the benchmark times the network itself
    size = bundle.input_size
    grid: dict[str, dict[str, float]] = {"float32": {}, f"autocast_{str(amp).split('.')[-1]}": {}, "uint8_host": {}}
    for batch in batch_sizes:
        x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            grid["float32"][str(batch)] = _timed(lambda x=x: model(x), seconds, batch)
            with torch.autocast("cuda", dtype=amp):
                key = f"autocast_{str(amp).split('.')[-1]}"
                grid[key][str(batch)] = _timed(lambda x=x: model(x), seconds, batch)
        host = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
        grid["uint8_host"][str(batch)] = _timed(lambda h=host: predictor.predict_images(h), seconds, batch)
        log.info("batch %d: %s", batch, {k: v[str(batch)] for k, v in grid.items()})
    best = {k: max(v.items(), key=lambda kv: kv[1]) for k, v in grid.items()}
    return {"grid": grid, "best": {k: {"batch": int(b), "img_s": r} for k, (b, r) in best.items()},
            "amp": str(amp), "memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def compute_ceiling(bundle_path: Path, images: list[bytes], batch: int, workers: int, seconds: float) -> dict[str, Any]:
    """Section 2: decode + preprocess + model of in-memory JPEG bytes, and decode alone, images/s."""
    from skinscan.model.bundle import load_bundle
    from skinscan.model.scorer import Scorer

    scorer = Scorer(load_bundle(bundle_path), backend="torch", batch_size=batch, decode_workers=workers,
                    device="cuda")
    items = [(str(i), d) for i, d in enumerate(images)]

    def decode_all() -> None:
        list(scorer._pool.map(scorer.prepare, images))  # noqa: SLF001

    def score_all() -> None:
        scorer.score_bytes(items)

    decode = _timed(decode_all, seconds, len(images))
    full = _timed(score_all, seconds, len(images))
    return {"img_s": full, "decode_only_img_s": decode, "batch": batch, "decode_workers": scorer.decode_workers}


def nvjpeg_ceiling(bundle_path: Path, images: list[bytes], batch: int, seconds: float) -> dict[str, Any]:
    """Optional: decode on the GPU with nvJPEG, resize there (antialiased bilinear, close to Pillow's), score."""
    import torch
    import torchvision
    from torchvision.transforms.v2 import functional as F

    from skinscan.model.bundle import load_bundle
    from skinscan.model.predictor import load_predictor

    bundle = load_bundle(bundle_path)
    predictor = load_predictor(bundle, backend="torch", device="cuda")
    data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]
    size, resize = bundle.input_size, bundle.resize_size
    mean = torch.tensor(bundle.meta["mean"], device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(bundle.meta["std"], device="cuda").view(1, 3, 1, 1)

    def score_all() -> None:
        for start in range(0, len(data), batch):
            decoded = torchvision.io.decode_jpeg(data[start : start + batch], device="cuda")
            crops = [F.center_crop(F.resize(img, [resize], antialias=True), [size, size]) for img in decoded]
            x = ((torch.stack(crops).float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", dtype=predictor._amp):  # noqa: SLF001
                predictor._model(x).float().softmax(1).cpu()  # noqa: SLF001

    return {"img_s": _timed(score_all, seconds, len(images)), "batch": batch,
            "note": "GPU resize differs slightly from Pillow's; the worker decodes with Pillow"}


def worker_path(bundle_path: Path, images: list[tuple[str, bytes]], chunk: int, workers: int) -> dict[str, Any]:
    """Section 3: store images and a job, then run pipeline.score_chunk over its chunks; images/s."""
    tmp = Path(tempfile.mkdtemp(prefix="skinscan-gpu-bench-"))
    os.environ.update({"SKINSCAN_DATA_DIR": str(tmp), "SKINSCAN_MODEL": str(bundle_path),
                       "SKINSCAN_DECODE_WORKERS": str(workers)})
    for name in ("REDIS_URL", "S3_BUCKET"):
        os.environ.pop(name, None)
    import io

    from skinscan.db import session_scope
    from skinscan.jobs.dispatch import chunked, pending_image_ids
    from skinscan.jobs.intake import create_job
    from skinscan.migrate import upgrade
    from skinscan.settings import load_settings
    from skinscan.storage import get_storage
    from skinscan.tables import Clinic
    from worker import pipeline

    load_settings.cache_clear()  # the environment changed just above
    settings = load_settings()
    upgrade(settings)
    with session_scope(settings) as session:
        clinic = Clinic(name="gpu-bench")
        session.add(clinic)
        session.flush()
        files = [(name, io.BytesIO(data)) for name, data in images]
        job_id = create_job(session, get_storage(settings), clinic, files, None, settings, "benchmark").job.id
    with session_scope(settings) as session:
        chunks = chunked(pending_image_ids(session, job_id), chunk)
    pipeline.score_chunk(job_id, chunks[0][:8], settings)  # loads the model; not timed
    start = time.perf_counter()
    scored = 8 + sum(pipeline.score_chunk(job_id, c, settings) for c in chunks)
    seconds = time.perf_counter() - start
    return {"img_s": round((scored - 8) / seconds, 1), "images": scored, "seconds": round(seconds, 2),
            "chunk_size": chunk, "database": settings.database_url.split(":", 1)[0], "storage": "local folder"}


def main(argv: list[str] | None = None) -> int:
    """Run sections 1-3 on the GPU, print the table, write the JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    if not torch.cuda.is_available():
        log.error("no CUDA GPU visible to PyTorch: benchmarks/gpu.py measures the GPU path and needs one "
                  "(use benchmarks/throughput.py on a CPU machine)")
        return 2
    try:
        bundle = resolve_bundle(args.model, args.out.parent / "cache")
        machine = machine_info()
        images = load_images(args.images)
        workers = args.decode_workers or len(os.sched_getaffinity(0))
        results: dict[str, Any] = {"model_ceiling": model_ceiling(bundle, [int(b) for b in args.batch_sizes.split(",")],
                                                                 args.seconds)}
        best_batch = max(results["model_ceiling"]["best"]["uint8_host"]["batch"], 64)
        results["compute_ceiling"] = compute_ceiling(bundle, [d for _, d in images], best_batch, workers, args.seconds)
        if args.nvjpeg:
            try:
                results["compute_ceiling_nvjpeg"] = nvjpeg_ceiling(bundle, [d for _, d in images], best_batch,
                                                                   args.seconds)
            except Exception as exc:  # noqa: BLE001 - optional figure; report why it is missing
                results["compute_ceiling_nvjpeg"] = {"error": f"{type(exc).__name__}: {exc}"}
        results["worker_path"] = worker_path(bundle, images, args.chunk_size, workers)
    except BenchmarkError as exc:
        log.error("%s", exc)
        return 1
    mc = results["model_ceiling"]["best"]
    figs = {"model_ceiling_img_s": max(v["img_s"] for v in mc.values()),
            "compute_ceiling_img_s": results["compute_ceiling"]["img_s"],
            "worker_img_s": results["worker_path"]["img_s"]}
    write_json(args.out, {**figs, "machine": machine, "bundle": str(bundle), "sections": results,
                          "options": vars(args)})
    rows = [(f"1. model ceiling ({k})", f"{v['img_s']:,.1f}", f"img/s, batch {v['batch']}") for k, v in mc.items()]
    cc = results["compute_ceiling"]
    rows += [("2. compute ceiling", f"{cc['img_s']:,.1f}", f"img/s, batch {cc['batch']}, {cc['decode_workers']} "
              "decode threads"), ("   decode only", f"{cc['decode_only_img_s']:,.1f}", "img/s")]
    nv = results.get("compute_ceiling_nvjpeg")
    if nv:
        value = f"{nv['img_s']:,.1f}" if "img_s" in nv else "-"
        rows.append(("   with nvJPEG decode", value, nv.get("error", "img/s")))
    wp = results["worker_path"]
    rows.append(("3. worker path", f"{wp['img_s']:,.1f}", f"img/s, chunks of {wp['chunk_size']}, {wp['database']}"))
    print_table(f"SkinScan GPU throughput: {', '.join(machine['gpus'])}, {machine['cpu_count']} CPUs", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
