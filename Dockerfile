# The one image of the hfgan workers (coordinator, server, clustering, aggregator, client) and the `hfgan` CLI.
#
#   docker build -t hfgan:dev .
#   docker run --rm hfgan:dev                       # prints `hfgan --help`
#   docker compose up --scale client=4              # the whole stack, see compose.yaml
#
# torch is installed first from PyTorch's CPU index, so that nothing later can pull a CUDA build from PyPI
# (gigabytes the CPU workers never use); the project's dependency range admits that build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)"

WORKDIR /app

# The other dependencies in their own layer: a source change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
RUN pip install . \
    && rm -rf build ./*.egg-info \
    && python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)"

# Unprivileged user. /data (datasets) and /runs (checkpoints, images, reports) exist in the image with this user as
# owner, so the named volumes compose mounts there start out writable by it.
RUN useradd --create-home --uid 10001 --user-group hfgan \
    && mkdir -p /data /runs \
    && chown hfgan:hfgan /data /runs
USER hfgan

ENV HFGAN_DATA_DIR=/data \
    HFGAN_RUN_DIR=/runs/latest

CMD ["hfgan", "--help"]
