"""amqps:// broker URLs: TLS options from the URL, the certificate always verified (transport/amqp/tls.py)."""

from __future__ import annotations

import ssl

import pytest

from hfgan_core.transport import TransportError
from hfgan_core.transport.amqp import AmqpTransport


def test_plain_url_has_no_tls():
    params = AmqpTransport._parameters("amqp://u:p@host:5672/%2F", "t")
    assert params.ssl_options is None and params.port == 5672


def test_amqps_verifies_the_certificate_and_the_host_name():
    params = AmqpTransport._parameters("amqps://u:p@rabbitmq/%2F", "t")
    ctx = params.ssl_options.context
    assert params.port == 5671
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert params.ssl_options.server_hostname == "rabbitmq"


def test_cafile_and_server_name_come_from_the_query(tmp_path):
    # A CA certificate from the standard library's own test data would do, but none ships everywhere: use the
    # system bundle as "the CA file" (what matters is that it is loaded, and that pika never sees the keys).
    bundle = ssl.get_default_verify_paths().cafile or ssl.get_default_verify_paths().openssl_cafile
    params = AmqpTransport._parameters(f"amqps://u:p@10.0.0.5:5671/%2F?cafile={bundle}&server_name=rabbitmq", "t")
    assert params.ssl_options.server_hostname == "rabbitmq"
    assert params.ssl_options.context.get_ca_certs(), "the CA file was not loaded"
    assert params.heartbeat is not None  # our defaults still apply next to the TLS keys


def test_bad_tls_settings_are_clear_errors(tmp_path):
    with pytest.raises(TransportError, match="needs an amqps://"):
        AmqpTransport._parameters(f"amqp://u:p@h/%2F?cafile={tmp_path}/ca.pem", "t")
    with pytest.raises(TransportError, match="cannot load cafile"):
        AmqpTransport._parameters(f"amqps://u:p@h/%2F?cafile={tmp_path}/missing.pem", "t")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TransportError, match="cannot load cafile"):
        AmqpTransport._parameters(f"amqps://u:p@h/%2F?cafile={tmp_path}/junk.pem", "t")
