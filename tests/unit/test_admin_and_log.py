"""Admin routing and log formatting (pure)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging

from proxy.admin import route
from proxy.core.headers import trace_id
from proxy.log import AccessRecord, JsonFormatter, TextFormatter


def test_admin_routes() -> None:
    assert route(b"GET", b"/healthz") == "live"
    assert route(b"GET", b"/livez") == "live"
    assert route(b"HEAD", b"/readyz?verbose") == "ready"
    assert route(b"GET", b"/metrics") == "metrics"
    assert route(b"GET", b"/") is None
    assert route(b"POST", b"/metrics") == "method"


RECORD = AccessRecord(
    time=0.0,
    client="192.0.2.1",
    method="GET",
    path="/a?b",
    status=200,
    bytes_in=3,
    bytes_out=10,
    duration=0.0123,
    upstream_duration=None,
    tls_version="TLSv1.3",
    request_id="r1",
    host="shop.example",
    user_agent="curl/8.0",
    sni="shop.example",
    cipher="TLS_AES_256_GCM_SHA384",
    upstream_status=200,
)


def test_access_record_json_has_every_field() -> None:
    doc = json.loads(RECORD.as_json())
    assert doc == {
        "time": "1970-01-01T00:00:00.000Z",
        "client": "192.0.2.1",
        "method": "GET",
        "path": "/a?b",
        "status": 200,
        "bytes_in": 3,
        "bytes_out": 10,
        "duration_ms": 12.3,
        "upstream_ms": None,
        "upstream_status": 200,
        "host": "shop.example",
        "user_agent": "curl/8.0",
        "protocol": "http/1.1",
        "tls": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "sni": "shop.example",
        "request_id": "r1",
    }


def test_access_record_json_says_who_and_why_with_mutual_tls_and_traces() -> None:
    doc = json.loads(
        dataclasses.replace(
            RECORD,
            identity="spiffe://example.org/ns/shop/sa/web",
            denied=None,
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        ).as_json()
    )
    assert doc["identity"] == "spiffe://example.org/ns/shop/sa/web"
    assert doc["denied"] is None
    assert doc["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_trace_id_is_read_from_a_valid_traceparent_only() -> None:
    good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id(good) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id(b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01") is None  # all-zero: invalid
    assert trace_id(b"garbage") is None


def test_access_record_text() -> None:
    assert (
        RECORD.as_text()
        == "1970-01-01T00:00:00.000Z 192.0.2.1 \"GET /a?b\" 200 in=3 out=10 12.3ms upstream=-ms http/1.1 TLSv1.3 id=r1 host=shop.example sni=shop.example ua='curl/8.0'"
    )


def test_log_formatters_carry_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"msg": "listening", "levelname": "INFO", "listen": ["127.0.0.1:1"]}
    )
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "listening" and doc["level"] == "info" and doc["listen"] == ["127.0.0.1:1"]
    assert "listen=['127.0.0.1:1']" in TextFormatter().format(record)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    assert isinstance(handler.formatter, JsonFormatter)
