# The one image of the hfgan workers (coordinator, server, clustering, aggregator, client) and the `hfgan` CLI.
#
#   docker build -t hfgan:dev .                     # python:3.11-slim, torch from PyTorch's CPU index
#   docker run --rm hfgan:dev                       # prints `hfgan --help`
#   docker compose up                               # the whole stack, see compose.yaml
#
# Two build arguments choose where Python and torch come from (docs/deployment.md):
#   BASE_IMAGE      an image with python3 (3.11) and its venv module: python:3.11-slim, or the local Debian image
#                   scripts/compose-images.sh builds (hfgan-local/python:3.11) where Docker Hub is out of reach
#   TORCH_PIP_ARGS  where pip finds torch==2.13.0: PyTorch's CPU index, or `--find-links /wheels` for a wheel copied
#                   into deploy/wheels/ (scripts/compose-images.sh does; git ignores the wheels)
# torch is installed first and alone, so that nothing later can pull a CUDA build from PyPI (gigabytes the CPU
# workers never use); the project's dependency range admits that build. It is installed in a throw-away stage, so a
# wheel copied into the build context never becomes a layer of the image.
ARG BASE_IMAGE=python:3.11-slim

# The dependency lists of pyproject.toml, alone: the stage below copies these two files, not pyproject.toml, so an
# edit of anything else there (version, tool settings) or of the source keeps the dependency layers cached.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb')); \
open('/tmp/requirements.txt', 'w').write('\n'.join(p['project']['dependencies']) + '\n'); \
open('/tmp/build-requirements.txt', 'w').write('\n'.join(p['build-system']['requires']) + '\n')"

FROM ${BASE_IMAGE} AS deps
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/wheels/ /wheels/
RUN python3 -m venv /opt/hfgan \
    && /opt/hfgan/bin/pip install torch==2.13.0 ${TORCH_PIP_ARGS} \
    && /opt/hfgan/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)"
# The other dependencies, and the build backend (so that installing the project below needs no network: no
# isolated build environment is downloaded on every source change).
COPY --from=requirements /tmp/requirements.txt /tmp/build-requirements.txt /tmp/
RUN /opt/hfgan/bin/pip install -r /tmp/requirements.txt -r /tmp/build-requirements.txt

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/hfgan/bin:$PATH
# Unprivileged user. /data (datasets) and /runs (checkpoints, images, reports) exist in the image with this user as
# owner, so the named volumes compose mounts there start out writable by it. Before the source: cached.
RUN useradd --create-home --uid 10001 --user-group hfgan \
    && mkdir -p /data /runs \
    && chown hfgan:hfgan /data /runs
# The legacy builder re-hashes this 1.2 GB venv on every build to find it in its cache (docs/deployment.md
# measures what a rebuild after a source change costs); the layer itself is reused.
COPY --from=deps /opt/hfgan /opt/hfgan

WORKDIR /app
# Only what the package needs (never deploy/wheels: the wheel stays out of the image). The last layers: a source
# change rebuilds only these.
COPY pyproject.toml README.md ./
COPY hfgan_core ./hfgan_core
COPY workers ./workers
COPY broker_config ./broker_config
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)"
USER hfgan

ENV HFGAN_DATA_DIR=/data \
    HFGAN_RUN_DIR=/runs/latest

CMD ["hfgan", "--help"]
