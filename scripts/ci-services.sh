#!/usr/bin/env bash
# Make sure the services of the integration tests answer on 127.0.0.1 (RabbitMQ 5672, Redis 6379), starting them
# if they are down, and give the broker what the tests and a local run need. Idempotent: run it as often as you
# like (CI runs it before the tests). Needs the rights to run rabbitmqctl (root or the rabbitmq user).
#
#   scripts/ci-services.sh            check / start / set up, then print a one-line summary
#
# Broker setup: the stream queue type's feature flag, and broker_config/definitions.json imported (the hfgan
# topology, the role users and client-0..3 with their development passwords, see broker_config/README.md).
# The import merges: the guest user and anything else already there are left as they are.
set -euo pipefail
cd "$(dirname "$0")/.."

AMQP_PORT=${HFGAN_AMQP_PORT:-5672}
REDIS_PORT=${HFGAN_REDIS_PORT:-6379}
WAIT_S=${HFGAN_SERVICES_WAIT_S:-120}

log() { printf 'ci-services: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_until() {  # wait_until WHAT COMMAND...: retry COMMAND every second for WAIT_S seconds
  local what=$1; shift
  local i
  for ((i = 0; i < WAIT_S; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  die "$what did not come up within ${WAIT_S} s"
}

# ------------------------------------------------------------------------------------------------ RabbitMQ
command -v rabbitmq-server >/dev/null || die "rabbitmq-server is not installed"
if ! port_open "$AMQP_PORT"; then
  log "RabbitMQ is down: starting it"
  rabbitmq-server -detached
fi
wait_until "RabbitMQ" rabbitmqctl -q await_startup --timeout 10
wait_until "RabbitMQ's AMQP listener" port_open "$AMQP_PORT"

# Streams (the update log) need the stream_queue feature flag; new 3.10 nodes have it, upgraded ones may not.
flags=$(rabbitmqctl -q list_feature_flags name state)  # captured: grep -q under pipefail could see SIGPIPE
if ! grep -Eq '^stream_queue[[:space:]]+enabled' <<<"$flags"; then
  log "enabling the stream_queue feature flag"
  rabbitmqctl -q enable_feature_flag stream_queue
fi

# The topology and users; through stdin, so the broker's own user need not read the file. The import runs
# asynchronously: wait until its last user exists.
rabbitmqctl -q import_definitions --format json < broker_config/definitions.json >/dev/null
last_user=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["users"][-1]["name"])' \
  broker_config/definitions.json)
wait_until "the definitions import" bash -c "rabbitmqctl -q list_users | grep -q '^${last_user}[[:space:]]'"

# --------------------------------------------------------------------------------------------------- Redis
command -v redis-server >/dev/null || die "redis-server is not installed"
if [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null || true)" != PONG ]]; then
  log "Redis is down: starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_until "Redis" bash -c "redis-cli -h 127.0.0.1 -p $REDIS_PORT ping | grep -q PONG"

log "RabbitMQ $(rabbitmqctl -q version 2>/dev/null || echo '?') on :$AMQP_PORT and" \
  "Redis $(redis-cli -h 127.0.0.1 -p $REDIS_PORT info server | sed -n 's/^redis_version:\(.*\)\r$/\1/p') on :$REDIS_PORT are ready"
