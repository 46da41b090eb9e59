# dicom-node, CPU image: the listener, scoring, delivery and the status server in one process.
#   docker build -t dicom-node .
#   docker run -v node-data:/data -v $PWD/deploy/config.docker.toml:/etc/dicom-node/config.toml:ro \
#              -v $PWD/runs/model:/models:ro -p 11112:11112 -p 127.0.0.1:8080:8080 dicom-node
# The same install steps run without Docker in .ci/deploy_check.sh (wheel into a fresh venv as a
# non-root user, then --version and a /readyz probe).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY inference ./inference
COPY training ./training
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
# CPU-only PyTorch: PyPI's default torch wheel for x86_64 carries CUDA (several GB). Set
# TORCH_INDEX=https://pypi.org/simple to take torch from PyPI instead.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.2"
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin dicomnode \
 && mkdir -p /data /etc/dicom-node /models && chown dicomnode:dicomnode /data
COPY deploy/config.docker.toml /etc/dicom-node/config.toml
USER dicomnode
WORKDIR /data
VOLUME ["/data"]
# DICOM listener, HTTP status server ([http] in the config)
EXPOSE 11112 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
ENTRYPOINT ["dicom-node"]
CMD ["--log-format", "json", "serve", "--config", "/etc/dicom-node/config.toml"]
