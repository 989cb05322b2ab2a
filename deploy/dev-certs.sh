#!/bin/sh
# One-shot `dev-certs` service of compose.yaml (runs as root in the RabbitMQ image, which has openssl): makes the
# stack's development TLS files once, in named volumes, and keeps them on every later `up`:
#
#   /out/ca/ca.pem              the development CA's certificate      -> workers (tls-ca volume, read-only)
#   /out/server/server.pem|key  RabbitMQ's certificate and key        -> rabbitmq (tls-server volume, read-only)
#
# (Redis's users and passwords: the `state-users` one-shot, hfgan_core/state/acl.py.)
#
# The server certificate names `rabbitmq` (the compose network), localhost, 127.0.0.1 and whatever
# $HFGAN_TLS_NAMES adds (comma-separated DNS names or IPs, for clients on other machines). The CA key is
# discarded once the server certificate is signed: nobody can mint another certificate this CA vouches for.
# Remove the volumes (`docker compose down -v`) to make new ones. For anything beyond development, put your own
# CA's certificate and server certificate into the volumes instead (docs/deployment.md).
set -eu
umask 077
ca=/out/ca server=/out/server
owner=$(id -u rabbitmq):$(id -g rabbitmq)

if [ -s "$ca/ca.pem" ] && [ -s "$server/server.pem" ] && [ -s "$server/server.key" ]; then
  echo "dev-certs: keeping the existing CA and server certificate"
else
  work=$(mktemp -d)
  san="DNS:rabbitmq,DNS:localhost,IP:127.0.0.1"
  for name in $(echo "${HFGAN_TLS_NAMES:-}" | tr ',' ' '); do
    case "$name" in
      *[!0-9.]*) san="$san,DNS:$name" ;;
      *) san="$san,IP:$name" ;;
    esac
  done
  openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 825 -subj "/CN=hfgan development CA" \
    -keyout "$work/ca.key" -out "$work/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=rabbitmq" \
    -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' \
    "$san" > "$work/ext"
  openssl x509 -req -sha256 -days 825 -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -extfile "$work/ext" -out "$work/server.pem" 2>/dev/null
  install -m 0644 "$work/ca.pem" "$ca/ca.pem"
  install -m 0644 "$work/ca.pem" "$server/ca.pem"
  install -m 0644 "$work/server.pem" "$server/server.pem"
  install -m 0600 -o "${owner%:*}" -g "${owner#*:}" "$work/server.key" "$server/server.key"
  rm -rf "$work"
  echo "dev-certs: made a development CA and a server certificate for $san"
fi

