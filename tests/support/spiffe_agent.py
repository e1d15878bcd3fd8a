"""A SPIFFE Workload API server for the tests, as a SPIRE agent answers on its unix socket: the
public `SpiffeWorkloadAPI` service's FetchX509SVID and FetchX509Bundles streams (grpcio generic
handlers, the proto's messages from proxy/tls/workload_api.py), refusing calls without the
`workload.spiffe.io: true` header as the specification asks. A test pushes a rotated SVID, a
rotated bundle, a bad SVID or "no identity issued" (PERMISSION_DENIED) to every open stream,
and stops and starts the agent again. Certificates are made at run time with cryptography."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from proxy.tls import certs
from proxy.tls.workload_api import (
    FETCH_X509_BUNDLES,
    FETCH_X509_SVID,
    MESSAGES,
    SECURITY_HEADER,
    X509BundlesRequest,
    X509BundlesResponse,
    X509SVIDRequest,
    X509SVIDResponse,
)

TRUST_DOMAIN = "spiffe://example.org"
SERVER_ID = f"{TRUST_DOMAIN}/ns/default/sa/web"
_DENY = object()  # the queue item that ends a stream with PERMISSION_DENIED
_END = object()


def der(cert: Any) -> bytes:
    return bytes(cert.public_bytes(serialization.Encoding.DER))


def key_der(key: certs.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_svid(ca: certs.Issued, spiffe_id: str = SERVER_ID) -> certs.Issued:
    """An X.509 SVID: the SPIFFE ID as its URI SAN (and localhost, so that stock TLS clients
    check the host name as they always do)."""
    return certs.issue(ca, [spiffe_id, "localhost"], common_name="web", days=1)


def client_svid(ca: certs.Issued, spiffe_id: str) -> certs.Issued:
    return certs.issue(ca, [spiffe_id], common_name=spiffe_id.rsplit("/", 1)[-1], client=True)


@dataclass
class Identity:
    """What the agent hands out now."""

    svid: certs.Issued
    bundle: list[certs.Issued]
    federated: dict[str, list[certs.Issued]] = field(default_factory=dict)
    key: certs.PrivateKey | None = None  # None: the SVID's own; else a mismatching one
    spiffe_id: str = SERVER_ID

    def response(self) -> Any:
        svid = MESSAGES["X509SVID"](
            spiffe_id=self.spiffe_id,
            x509_svid=der(self.svid.certificate),
            x509_svid_key=key_der(self.key or self.svid.key),
            bundle=b"".join(der(ca.certificate) for ca in self.bundle),
        )
        return X509SVIDResponse(
            svids=[svid],
            federated_bundles={
                domain: b"".join(der(ca.certificate) for ca in cas)
                for domain, cas in self.federated.items()
            },
        )

    def bundles(self) -> Any:
        return X509BundlesResponse(
            bundles={
                TRUST_DOMAIN: b"".join(der(ca.certificate) for ca in self.bundle),
                **{
                    domain: b"".join(der(ca.certificate) for ca in cas)
                    for domain, cas in self.federated.items()
                },
            }
        )


class FakeAgent:
    """The Workload API on `socket_path`; `streams_opened` counts the FetchX509SVID streams a
    client opened (a reconnect opens another)."""

    def __init__(self, socket_path: Path, identity: Identity) -> None:
        self.socket_path = socket_path
        self.identity = identity
        self.denied = False
        self.streams_opened = 0
        self.refused_without_header = 0
        self.rotate_at_once: Identity | None = None
        self._lock = threading.Lock()
        self._streams: list[queue.Queue[Any]] = []
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> FakeAgent:
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        handlers = {
            "FetchX509SVID": grpc.unary_stream_rpc_method_handler(
                self._fetch_svid,
                request_deserializer=X509SVIDRequest.FromString,
                response_serializer=X509SVIDResponse.SerializeToString,
            ),
            "FetchX509Bundles": grpc.unary_stream_rpc_method_handler(
                self._fetch_bundles,
                request_deserializer=X509BundlesRequest.FromString,
                response_serializer=X509BundlesResponse.SerializeToString,
            ),
        }
        assert FETCH_X509_SVID.startswith("/SpiffeWorkloadAPI/")
        assert FETCH_X509_BUNDLES.startswith("/SpiffeWorkloadAPI/")
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("SpiffeWorkloadAPI", handlers),)
        )
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """As an agent that exits: every stream ends, the socket goes."""
        with self._lock:
            for stream in self._streams:
                stream.put(_END)
        if self._server is not None:
            self._server.stop(grace=None).wait(10)
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    def push(self, identity: Identity) -> None:
        """A rotation (or a bad update): every open stream gets the new response."""
        with self._lock:
            self.identity = identity
            for stream in self._streams:
                stream.put(identity)

    def deny(self) -> None:
        """The workload's registration entry was deleted: no identity issued."""
        with self._lock:
            self.denied = True
            for stream in self._streams:
                stream.put(_DENY)

    def _admit(self, context: grpc.ServicerContext) -> None:
        if SECURITY_HEADER not in tuple(context.invocation_metadata()):
            with self._lock:
                self.refused_without_header += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        if self.denied:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")

    def _open(self, context: grpc.ServicerContext) -> queue.Queue[Any]:
        stream: queue.Queue[Any] = queue.Queue()
        with self._lock:
            self._streams.append(stream)
            self.streams_opened += 1
            stream.put(self.identity)
            if self.rotate_at_once is not None:  # a rotation hard on the heels of the first SVID
                stream.put(self.rotate_at_once)
        context.add_callback(lambda: stream.put(_END))
        return stream

    def _close(self, stream: queue.Queue[Any]) -> None:
        with self._lock:
            self._streams.remove(stream)

    def _items(self, context: grpc.ServicerContext) -> Iterator[Identity]:
        self._admit(context)
        stream = self._open(context)
        try:
            while True:
                item = stream.get()
                if item is _END:
                    return
                if item is _DENY:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
                yield item
        finally:
            self._close(stream)

    def _fetch_svid(self, _request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for identity in self._items(context):
            yield identity.response()

    def _fetch_bundles(self, _request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for identity in self._items(context):
            yield identity.bundles()
