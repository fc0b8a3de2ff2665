"""An OTLP/HTTP sink for the telemetry bench: accepts any POST, reads the body, answers 200
with an empty body, and counts what it got (`GET /count`: requests and bytes). It runs on
the load core, so the gateway pays only for recording, encoding and sending.

    python -m bench.otlpsink --port P
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_count = {"requests": 0, "bytes": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter expects

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        _count["requests"] += 1
        _count["bytes"] += len(body)
        self._reply(b"", "application/x-protobuf")

    def do_GET(self) -> None:
        self._reply(json.dumps(_count).encode(), "application/json")

    def _reply(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlpsink")
    parser.add_argument("--port", type=int, required=True)
    ThreadingHTTPServer(("127.0.0.1", parser.parse_args().port), Handler).serve_forever()


if __name__ == "__main__":
    main()
