"""A small OTLP/HTTP receiver, run as its own process for the end-to-end telemetry tests.

    python -m tests.otlpreceiver --port P

Accepts `POST /v1/traces` and `POST /v1/metrics` (application/x-protobuf, gzip or not),
parses each body with the official `opentelemetry-proto` messages (so a malformed export is
a 400 here, as at a real collector) and keeps it; `GET /received` returns everything kept,
as JSON (protobuf's JSON mapping: ids in base64, 64-bit ints as strings), oldest first.
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

KINDS: dict[str, type[Message]] = {
    "/v1/traces": ExportTraceServiceRequest,
    "/v1/metrics": ExportMetricsServiceRequest,
}
_received: list[dict[str, Any]] = []
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        kind = KINDS.get(self.path)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if kind is None:
            self._reply(404, b"")
            return
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        message = kind()
        try:
            message.ParseFromString(body)
        except DecodeError as exc:
            self._reply(400, str(exc).encode())
            return
        entry = {
            "path": self.path,
            "content_type": self.headers.get("content-type"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": MessageToDict(message),
        }
        with _lock:
            _received.append(entry)
        self._reply(200, kind().SerializeToString())  # an empty Export*ServiceResponse

    def do_GET(self) -> None:
        if self.path != "/received":
            self._reply(404, b"")
            return
        with _lock:
            data = json.dumps(_received).encode()
        self._reply(200, data, "application/json")

    def _reply(self, status: int, body: bytes, kind: str = "application/x-protobuf") -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
