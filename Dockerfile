# syntax=docker/dockerfile:1.4
# optsel, one Dockerfile for two variants (docs/launching.md has the run recipes):
#
#   CUDA, for clusters (the default): the base image brings the CUDA user space; torch comes from PyPI,
#   whose default Linux wheel is the CUDA build, pinned to the version the tests run.
#     docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t optsel:0.1.0-cuda .
#
#   CPU, as CI builds it (bash scripts/container_image.sh): a Debian 12 base made locally with
#   debootstrap and the CPU torch wheel scripts/setup.sh installs, handed over as the `wheels` context.
#     podman build --build-arg BASE_IMAGE=localhost/optsel-base:bookworm --build-arg TORCH_VARIANT=cpu \
#       --build-context wheels=DIR_WITH_THE_torch-2.13.0+cpu_WHEEL --secret id=ca,src=... -t optsel:0.1.0-cpu .
#
# Every other Python package is pinned by requirements/lock.txt (the stack the test suite runs) and
# installed without dependency resolution, so the image holds exactly that set plus optsel's wheel.
# The `ca` secret is the CA bundle pip trusts (a TLS-intercepting proxy's); it never lands in a layer.
# Python 3.11 everywhere, as in the tests (Ubuntu 22.04's python3.11 packages; Debian 12's python3):
# the lock's wheels are cp311 (some pinned versions have none for 3.12, e.g. zstd 1.5.7.2).
ARG BASE_IMAGE=docker.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# Extra wheels for pip (--find-links); empty unless --build-context wheels=DIR replaces this stage.
FROM scratch AS wheels

FROM ${BASE_IMAGE}
ARG TORCH_VARIANT=cuda
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/optsel/venv PATH=/opt/optsel/venv/bin:$PATH \
    MPLCONFIGDIR=/tmp/optsel-matplotlib TORCH_EXTENSIONS_DIR=/tmp/optsel-torch-extensions

# Python with venv, and g++ + Python headers for DeepSpeed's JIT-built CPU ops (zero3_cpu_adam).
# The CI base already carries them (debootstrap --include), so apt runs only where something is missing.
RUN set -eu; missing=""; \
    for p in python3.11 python3.11-venv python3.11-dev g++ ca-certificates; do \
      dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done; \
    if [ -n "$missing" ]; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing && \
      rm -rf /var/lib/apt/lists/*; fi

# The non-root user; /workspace is where the README's commands write (data/, runs/): mount volumes there.
RUN useradd --create-home --uid 1000 --shell /bin/bash optsel && \
    mkdir -p /workspace/data /workspace/runs && chown -R optsel:optsel /workspace

# 1. The pinned stack (cached layer: changes only when the lock, the torch variant or the base changes).
COPY requirements/lock.txt /opt/optsel/lock.txt
RUN --mount=type=secret,id=ca --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3.11 -m venv "$VIRTUAL_ENV"; \
    pip install -q -c /opt/optsel/lock.txt pip setuptools wheel; \
    pip install -q --find-links /wheels -c /opt/optsel/lock.txt torch; \
    python -c "import torch, sys; v = torch.__version__; cuda = torch.version.cuda; \
      sys.exit(0 if ('$TORCH_VARIANT' == 'cpu') == (cuda is None) else f'torch {v} (cuda {cuda}) is not the $TORCH_VARIANT build')"; \
    pip install -q --no-deps --no-build-isolation -r /opt/optsel/lock.txt

# 2. optsel itself, as a wheel built from this context (never editable), without dependency changes.
COPY pyproject.toml README.md /tmp/optsel-src/
COPY optsel /tmp/optsel-src/optsel
COPY configs /tmp/optsel-src/configs
COPY pipeline /tmp/optsel-src/pipeline
COPY selection /tmp/optsel-src/selection
COPY launch /tmp/optsel-src/launch
COPY monitoring /tmp/optsel-src/monitoring
RUN set -eu; cd /tmp/optsel-src; \
    pip wheel -q --no-deps --no-build-isolation --wheel-dir /tmp/optsel-dist . && \
    pip install -q --no-deps /tmp/optsel-dist/optsel-*.whl && \
    rm -rf /tmp/optsel-src /tmp/optsel-dist && \
    cd / && python -c "import optsel.launch.cli, optsel.pipeline.data.streaming_compat; from optsel import resources; \
      assert resources.dashboard_path().is_file(); print('optsel', optsel.__version__, 'from', optsel.__file__)"

USER optsel
WORKDIR /workspace
# Metrics: monitoring.port in configs/demo.yaml. Bind them for scraping from outside with
#   podman run -p 9477:9477 ... optsel:... launch --nproc 2 demo monitoring.bind_address=0.0.0.0
EXPOSE 9477
# Healthy while a run serves its metrics (a run's rank 0); other commands report "unhealthy" harmlessly.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=4)"
ENTRYPOINT ["optsel"]
CMD ["--help"]
