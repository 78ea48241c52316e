"""An HTTP proxy in front of a real MLflow server that throttles or stalls on demand.

MLflow's own server never throttles; gateways in front of it do. The proxy forwards every
request to the real server, except that the next ``log-batch`` calls can be answered with
429 or 503 and a Retry-After header, the way a rate-limiting gateway answers. It notes when
each ``log-batch`` call arrived and how it was answered.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"}


@dataclass(frozen=True)
class Call:
    at: float  # time.monotonic() on arrival
    status: int


class ThrottlingProxy:
    """Forward to ``upstream``; answer queued ``log-batch`` calls with a throttling status."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlparse(upstream)
        self.calls: list[Call] = []
        self._answers: deque[tuple[int, str | None]] = deque()
        self._delays: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                arrived = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                delay = proxy._next_delay(self.path)
                if delay:
                    time.sleep(delay)  # the client gives up; the server still gets the request
                throttle = proxy._next_answer(self.path, arrived)
                if throttle is not None:
                    status, retry_after = throttle
                    payload = b'{"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}'
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                status, headers, answer = proxy._forward(
                    self.command, self.path, self.headers, body
                )
                if "log-batch" in self.path:
                    proxy._note(arrived, status)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def throttle_next(self, status: int, retry_after: str | None, times: int = 1) -> None:
        """Answer the next ``times`` log-batch calls with ``status`` and ``Retry-After``."""
        with self._lock:
            self._answers.extend([(status, retry_after)] * times)

    def delay_next(self, path_part: str, seconds: float) -> None:
        """Hold the next request whose path contains ``path_part``, then forward it."""
        with self._lock:
            self._delays.append((path_part, seconds))

    def _next_delay(self, path: str) -> float:
        with self._lock:
            for i, (part, seconds) in enumerate(self._delays):
                if part in path:
                    del self._delays[i]
                    return seconds
        return 0.0

    def log_batch_calls(self) -> list[Call]:
        """Every ``log-batch`` call so far, in the order they arrived."""
        with self._lock:
            return sorted(self.calls, key=lambda call: call.at)

    def _next_answer(self, path: str, arrived: float) -> tuple[int, str | None] | None:
        if "log-batch" not in path:
            return None
        with self._lock:
            if not self._answers:
                return None
            answer = self._answers.popleft()
            self.calls.append(Call(arrived, answer[0]))
            return answer

    def _note(self, arrived: float, status: int) -> None:
        with self._lock:
            self.calls.append(Call(arrived, status))

    def _forward(
        self, method: str, path: str, headers: object, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}  # type: ignore[attr-defined]
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def __enter__(self) -> ThrottlingProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
