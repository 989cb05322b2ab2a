# hfgan-local/redis:7: Debian's redis-server (7.0) laid out as redis:7 is for compose.yaml: data in /data (a
# volume), the server in the foreground as the redis user, configured by the command line.
ARG DEBIAN_IMAGE=hfgan-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
