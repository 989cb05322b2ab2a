#!/usr/bin/env bash
# Make sure this machine can run the compose stack: docker (the engine), docker-compose and mmdebstrap installed
# (Debian's packages, with apt-get, as root), and a Docker engine answering (dockerd started in the background
# when none runs, logging to /var/log/hfgan-dockerd.log). Idempotent; scripts/test.sh runs it.
set -euo pipefail

log() { printf 'compose-setup: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if ((${#missing[@]})); then
  [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 \
    || die "missing ${missing[*]}: install them (apt-get install ${missing[*]})"
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null; } \
    || die "apt-get install ${missing[*]} failed"
fi

if ! docker info >/dev/null 2>&1; then
  [[ "$(id -u)" == 0 ]] || die "no Docker engine answers and only root can start dockerd here"
  if ! pgrep -x dockerd >/dev/null; then
    log "starting dockerd (log: /var/log/hfgan-dockerd.log)"
    nohup dockerd >>/var/log/hfgan-dockerd.log 2>&1 &
  fi
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || die "dockerd did not answer within 60 s (see /var/log/hfgan-dockerd.log)"
fi
log "docker $(docker info --format '{{.ServerVersion}}' 2>/dev/null), $(docker-compose version --short 2>/dev/null)"
