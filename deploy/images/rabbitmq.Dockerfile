# hfgan-local/rabbitmq:3.10-management: Debian's rabbitmq-server (3.10) with the management plugin, laid out as
# rabbitmq:3.13-management is for compose.yaml: configuration in /etc/rabbitmq (rabbitmq.conf, enabled_plugins,
# definitions.json, mounted), data in /var/lib/rabbitmq (a volume), node rabbit@<hostname>, logs on the console,
# the server in the foreground as the rabbitmq user. openssl is here for the dev-certs one-shot (deploy/dev-certs.sh),
# which the official image's openssl serves on the other path.
ARG DEBIAN_IMAGE=hfgan-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server openssl \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o rabbitmq -g rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
ENV RABBITMQ_LOGS=- HOME=/var/lib/rabbitmq
USER rabbitmq
EXPOSE 5671 5672 15672
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
