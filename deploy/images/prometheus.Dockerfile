# hfgan-local/prometheus: Debian's prometheus (2.42) laid out as prom/prometheus is for compose.yaml: the
# configuration mounted at /etc/prometheus/prometheus.yml, data in /prometheus (a volume), the server as the
# entry point (compose.yaml gives its flags), run as the prometheus user.
ARG DEBIAN_IMAGE=hfgan-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o prometheus -g prometheus /prometheus
WORKDIR /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
