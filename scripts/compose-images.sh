#!/usr/bin/env bash
# Build the local images of the compose stack, for machines without Docker Hub (docs/deployment.md):
#
#   scripts/compose-images.sh            build what is missing or changed (Docker's layer cache does the rest)
#   docker-compose -f compose.yaml -f deploy/compose.local.yaml up
#
# hfgan-local/debian:bookworm      Debian's minbase made by mmdebstrap, imported (once per machine)
# hfgan-local/python:3.11          python3 + venv           (stands in for python:3.11-slim)
# hfgan-local/rabbitmq:3.10-management  Debian's rabbitmq-server (stands in for rabbitmq:3.13-management)
# hfgan-local/redis:7              Debian's redis-server 7.0 (stands in for redis:7)
# hfgan-local/prometheus           Debian's prometheus 2.42 (stands in for prom/prometheus)
# hfgan:local                      the Dockerfile on hfgan-local/python:3.11, torch from the local wheel
#
# The torch wheel: $HFGAN_TORCH_WHEEL, or torch-2.13.0*.whl in pip's find-links (`pip config list`); it is copied
# into deploy/wheels/ (ignored by git). The machine's CA bundle ($HFGAN_HOST_CA_BUNDLE, else pip's $PIP_CERT, else
# Debian's) goes into hfgan-local/python, so pip inside the build trusts what pip here trusts. Environment:
# HFGAN_DEBIAN_MIRROR (mmdebstrap's mirror, default Debian's).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p deploy/local

log() { printf 'compose-images: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# The legacy builder: it needs no buildx plugin (Debian's docker.io 20.10 has none), and the Dockerfiles need
# nothing newer.
build() {  # build NAME ARGS...: one image, its log in deploy/local/build-NAME.log
  local name=$1 out=deploy/local/build-$1.log
  shift
  DOCKER_BUILDKIT=0 docker build "$@" >"$out" 2>&1 || { tail -40 "$out" >&2; die "docker build of $name failed ($out)"; }
}

command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd)"

base=hfgan-local/debian:bookworm
if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "making $base with mmdebstrap (about a minute)"
  mmdebstrap --quiet --variant=minbase bookworm "$tmp/base.tar" ${HFGAN_DEBIAN_MIRROR:-} \
    || die "mmdebstrap failed"
  docker import "$tmp/base.tar" "$base" >/dev/null
fi

wheel=${HFGAN_TORCH_WHEEL:-}
if [[ -z "$wheel" ]]; then
  for dir in $(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") ${PIP_FIND_LINKS:-}; do
    for w in "$dir"/torch-2.13.0*cp311*.whl; do [[ -f "$w" ]] && wheel=$w; done
  done
fi
[[ -n "$wheel" && -f "$wheel" ]] || die "no torch 2.13.0 cp311 wheel found (set HFGAN_TORCH_WHEEL)"
if ! cmp -s "$wheel" "deploy/wheels/$(basename "$wheel")"; then
  log "copying $(basename "$wheel") into deploy/wheels/"
  cp "$wheel" deploy/wheels/
fi

bundle=${HFGAN_HOST_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
[[ -f "$bundle" ]] || die "no CA bundle at $bundle (set HFGAN_HOST_CA_BUNDLE)"
mkdir -p deploy/local
cmp -s "$bundle" deploy/local/host-ca-bundle.crt || cp "$bundle" deploy/local/host-ca-bundle.crt

log "building hfgan-local/python:3.11 -> hfgan:local, and the RabbitMQ, Redis and Prometheus images"
# The infrastructure images build while the worker image does (mostly downloads: they overlap well).
build rabbitmq -t hfgan-local/rabbitmq:3.10-management -f deploy/images/rabbitmq.Dockerfile deploy/images &
rabbit_pid=$!
build redis -t hfgan-local/redis:7 -f deploy/images/redis.Dockerfile deploy/images &
redis_pid=$!
build prometheus -t hfgan-local/prometheus -f deploy/images/prometheus.Dockerfile deploy/images &
prometheus_pid=$!
build python -t hfgan-local/python:3.11 -f deploy/images/python.Dockerfile deploy/local
build hfgan -t hfgan:local --build-arg BASE_IMAGE=hfgan-local/python:3.11 \
  --build-arg TORCH_PIP_ARGS="--find-links /wheels" .
wait "$rabbit_pid" || die "the RabbitMQ image did not build"
wait "$redis_pid" || die "the Redis image did not build"
wait "$prometheus_pid" || die "the Prometheus image did not build"
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^hfgan' >&2
