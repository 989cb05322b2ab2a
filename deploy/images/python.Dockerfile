# hfgan-local/python:3.11: what the hfgan image needs from python:3.11-slim (python3 3.11 with venv, CA
# certificates, useradd), built on the local Debian base (scripts/compose-images.sh) where Docker Hub is out of reach.
# The build context is deploy/local/, where the script puts this machine's CA bundle: pip in the image trusts what
# the machine's pip trusts (a machine behind a TLS-inspecting proxy has the proxy's CA in it).
ARG DEBIAN_IMAGE=hfgan-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates passwd \
    && rm -rf /var/lib/apt/lists/*
COPY host-ca-bundle.crt /etc/ssl/certs/hfgan-host-ca-bundle.crt
ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/hfgan-host-ca-bundle.crt
CMD ["python3"]
