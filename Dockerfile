# optsel on a CUDA cluster node. Build: docker build -t optsel:0.1.0 .
# The base image pins CUDA, cuDNN and PyTorch; everything else is pinned below.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/home/optsel/.cache/torch_extensions
RUN apt-get update && apt-get install -y --no-install-recommends g++ git numactl && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 optsel
WORKDIR /opt/optsel
COPY --chown=optsel:optsel pyproject.toml README.md ./
COPY --chown=optsel:optsel requirements requirements
COPY --chown=optsel:optsel optsel optsel
COPY --chown=optsel:optsel pipeline pipeline
COPY --chown=optsel:optsel selection selection
COPY --chown=optsel:optsel launch launch
COPY --chown=optsel:optsel monitoring monitoring
COPY --chown=optsel:optsel configs configs
# Keep the image's torch. streaming 0.13 pins transformers<5: install it without its deps, as on CPU.
RUN pip install "deepspeed==0.19.8" "transformers==5.23.0" "datasets==5.2.0" "peft==0.21.2" \
        "cvxpy==1.9.3" "prometheus-client==0.26.0" "pytest>=8" "pytest-timeout>=2.3" && \
    pip install --no-deps "mosaicml-streaming==0.13.0" && \
    pip install $(grep -vE '^(#|mosaicml-streaming|$)' requirements/streaming.txt) && \
    pip install --no-deps -e . && \
    python -c "import optsel.selection.base, optsel.pipeline.streaming_compat, optsel.monitoring; print('optsel import ok')"

USER optsel
EXPOSE 9400
ENTRYPOINT ["optsel"]
CMD ["--help"]
