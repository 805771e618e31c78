# Two targets from one file:
#   slim (the default, last stage): web, beat and a CPU worker (ONNX Runtime; heat maps from the ONNX model's feature
#        map). No PyTorch: `pip install .`.
#   gpu: the same plus the `gpu` extra (PyTorch with CUDA from PyPI) for a worker on an NVIDIA GPU
#        (docker-compose.gpu.yml builds the worker from it).
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY skinscan ./skinscan
COPY web ./web
COPY worker ./worker
COPY training ./training
COPY migrations ./migrations
RUN useradd --create-home skinscan
ENV SKINSCAN_DATA_DIR=/home/skinscan/data
EXPOSE 8000
CMD ["skinscan", "web"]

FROM base AS gpu
RUN pip install --no-cache-dir '.[gpu]'
USER skinscan

FROM base AS slim
RUN pip install --no-cache-dir .
USER skinscan
