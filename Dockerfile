# syntax=docker/dockerfile:1
# cvm-edge images. Two targets:
#   serve  the HTTP server only: the [serve] extra (onnxruntime, FastAPI, uvicorn), no torch
#   train  `cvm init` / `update` / `export` / `embed`: extras [train,embed] plus [serve] (export checks parity
#          with onnxruntime) and [offline] (bundled MiniLM and Lite0 weights)
#
#   docker build --target serve -t cvm-edge:serve .
#   docker build --target train -t cvm-edge:train .
# Both run as the unprivileged user cvm (uid 10001), so a store written by `train` is readable by `serve`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 cvm \
    && useradd --system --uid 10001 --gid cvm --home-dir /var/lib/cvm --create-home --shell /usr/sbin/nologin cvm
WORKDIR /app

# ---- build: one wheel of this project (no dependencies), shared by both targets ----
FROM base AS build
COPY pyproject.toml README.md constraints.txt ./
COPY cvm_edge ./cvm_edge
COPY llm_embeddings ./llm_embeddings
COPY deploy ./deploy
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- serve: onnxruntime + FastAPI, no torch ----
FROM base AS serve
COPY --from=build /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN wheel="$(ls /wheels/cvm_edge-*.whl)" \
    && pip install --constraint /tmp/constraints.txt "${wheel}[serve]" \
    && rm -rf /wheels /tmp/constraints.txt \
    && python -c "import importlib.util, sys; sys.exit(1 if importlib.util.find_spec('torch') else 0)"
USER 10001:10001
# The store (bundles/CURRENT is followed) is mounted here; the server only reads it.
VOLUME ["/var/lib/cvm/store"]
EXPOSE 8080
# Inside the container the server must listen on all interfaces for -p to reach it; publish the port
# on the host's loopback (-p 127.0.0.1:8080:8080) unless other machines should reach it.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
ENTRYPOINT ["cvm", "serve"]
CMD ["--workdir", "/var/lib/cvm/store", "--host", "0.0.0.0", "--port", "8080"]

# ---- train: torch, timm, sentence-transformers, the bundled offline weights (MiniLM, Lite0), and onnxruntime
# (`cvm update` exports a bundle and checks its parity with onnxruntime before publishing it) ----
FROM base AS train
# CPU-only torch wheels: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX=""
ARG EXTRAS="train,embed,serve,offline"
COPY --from=build /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN wheel="$(ls /wheels/cvm_edge-*.whl)" \
    && pip install --constraint /tmp/constraints.txt ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "${wheel}[${EXTRAS}]" \
    && rm -rf /wheels /tmp/constraints.txt
USER 10001:10001
VOLUME ["/var/lib/cvm/store"]
ENTRYPOINT ["cvm"]
CMD ["--help"]
