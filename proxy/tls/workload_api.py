"""The SPIFFE Workload API's X.509 half, spoken with grpcio: the public proto's messages, built
from their descriptor at run time (no generated code to keep in step with protobuf), and a
watcher thread that keeps a FetchX509SVID stream open and reconnects with backoff.

grpcio's streams block, so the watcher runs in a thread of its own; it hands every response and
every lost connection to the event loop (`call_soon_threadsafe`) and touches nothing else.
Imported only with --spiffe-endpoint: `serve` otherwise loads neither grpc nor protobuf."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

log = logging.getLogger("tls_sidecar.spiffe")

# What the SPIFFE Workload API specification asks of every call: without it the agent refuses.
SECURITY_HEADER = ("workload.spiffe.io", "true")
FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
FETCH_X509_BUNDLES = "/SpiffeWorkloadAPI/FetchX509Bundles"
BACKOFF_FIRST_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 30.0

_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_ONE = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_MANY = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

# workload.proto (github.com/spiffe/spiffe, standards/SPIFFE_Workload_API.md): the X.509 messages,
# field numbers as published. The proto has no package, so the names are global.
_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "X509SVIDRequest": [],
    "X509SVID": [
        ("spiffe_id", 1, _STRING, _ONE, ""),
        ("x509_svid", 2, _BYTES, _ONE, ""),  # ASN.1 DER certificates, leaf first, concatenated
        ("x509_svid_key", 3, _BYTES, _ONE, ""),  # PKCS#8 DER
        ("bundle", 4, _BYTES, _ONE, ""),  # the trust domain's CAs, DER, concatenated
        ("hint", 5, _STRING, _ONE, ""),
    ],
    "X509SVIDResponse": [
        ("svids", 1, _MESSAGE, _MANY, ".X509SVID"),
        ("crl", 2, _BYTES, _MANY, ""),
        ("federated_bundles", 3, _MESSAGE, _MANY, ".X509SVIDResponse.FederatedBundlesEntry"),
    ],
    "X509BundlesRequest": [],
    "X509BundlesResponse": [
        ("crl", 1, _BYTES, _MANY, ""),
        ("bundles", 2, _MESSAGE, _MANY, ".X509BundlesResponse.BundlesEntry"),
    ],
}
_MAPS = {"X509SVIDResponse": "FederatedBundlesEntry", "X509BundlesResponse": "BundlesEntry"}


def _field(owner: descriptor_pb2.DescriptorProto, spec: tuple[str, int, int, int, str]) -> None:
    name, number, kind, label, type_name = spec
    field = owner.field.add(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = type_name


def _build() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(name="workload.proto", syntax="proto3")
    for name, specs in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        for spec in specs:
            _field(message, spec)
        if name in _MAPS:  # map<string, bytes>: a nested entry message, as protoc writes it
            entry = message.nested_type.add(name=_MAPS[name])
            entry.options.map_entry = True
            _field(entry, ("key", 1, _STRING, _ONE, ""))
            _field(entry, ("value", 2, _BYTES, _ONE, ""))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        for name in _MESSAGES
    }


MESSAGES = _build()
X509SVIDRequest = MESSAGES["X509SVIDRequest"]
X509SVIDResponse = MESSAGES["X509SVIDResponse"]
X509BundlesRequest = MESSAGES["X509BundlesRequest"]
X509BundlesResponse = MESSAGES["X509BundlesResponse"]


def grpc_target(endpoint: str) -> str:
    """unix:///run/spire/agent.sock (the SPIFFE spelling) as grpcio takes it."""
    return "unix:" + endpoint[len("unix://") :] if endpoint.startswith("unix://") else endpoint


def describe(error: grpc.RpcError) -> str:
    """Why a stream ended, for a log line or the start-up error."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"the agent issued no identity to this workload ({details})"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"the agent cannot be reached ({details})"
    name = code.name if code is not None else "error"
    return f"the agent answered {name} ({details})"


def fetch_once(endpoint: str, timeout: float) -> Any:
    """The first X509SVIDResponse, for `tls-sidecar check`; grpc.RpcError when none comes."""
    with grpc.insecure_channel(grpc_target(endpoint)) as channel:
        fetch = channel.unary_stream(
            FETCH_X509_SVID,
            request_serializer=X509SVIDRequest.SerializeToString,
            response_deserializer=X509SVIDResponse.FromString,
        )
        call = fetch(X509SVIDRequest(), timeout=timeout, metadata=(SECURITY_HEADER,))
        try:
            return next(iter(call))
        finally:
            call.cancel()


class X509Watcher:
    """Keeps one FetchX509SVID stream open in a daemon thread; `on_response(response)` and
    `on_lost(reason)` are called in that thread (the caller hops them to its loop)."""

    def __init__(
        self,
        endpoint: str,
        on_response: Callable[[Any], object],
        on_lost: Callable[[str], object],
    ) -> None:
        self.endpoint = endpoint
        self._on_response = on_response
        self._on_lost = on_lost
        self._stopped = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name="spiffe-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        call = self._call
        if call is not None:
            call.cancel()

    def _run(self) -> None:
        backoff = BACKOFF_FIRST_SECONDS
        while not self._stopped.is_set():
            with grpc.insecure_channel(grpc_target(self.endpoint)) as channel:
                fetch = channel.unary_stream(
                    FETCH_X509_SVID,
                    request_serializer=X509SVIDRequest.SerializeToString,
                    response_deserializer=X509SVIDResponse.FromString,
                )
                try:
                    self._call = fetch(X509SVIDRequest(), metadata=(SECURITY_HEADER,))
                    for response in self._call:
                        backoff = BACKOFF_FIRST_SECONDS
                        self._on_response(response)
                    reason = "the agent ended the stream"
                except grpc.RpcError as e:
                    reason = describe(e)
                finally:
                    self._call = None
            if self._stopped.is_set():
                return
            self._on_lost(reason)
            self._stopped.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
