"""Admin routing and log formatting (pure)."""

from __future__ import annotations

import io
import json
import logging

from proxy.admin import route
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
        "protocol": "http/1.1",
        "tls": "TLSv1.3",
        "request_id": "r1",
    }


def test_access_record_text() -> None:
    assert (
        RECORD.as_text()
        == '1970-01-01T00:00:00.000Z 192.0.2.1 "GET /a?b" 200 in=3 out=10 12.3ms upstream=-ms http/1.1 TLSv1.3 id=r1'
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
