# One image for web, worker and beat. CPU by default; docker-compose.gpu.yml gives the worker a GPU and the same
# image uses it (torch 2.14.1 wheels from PyPI carry CUDA). A slim CPU target and a GPU target would save most
# of the image only once torch stops being a dependency of serving (web and ONNX workers import it today), so
# this stays one image until then.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY skinscan ./skinscan
COPY web ./web
COPY worker ./worker
COPY training ./training
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --create-home skinscan
USER skinscan
ENV SKINSCAN_DATA_DIR=/home/skinscan/data
EXPOSE 8000
CMD ["skinscan", "web"]
