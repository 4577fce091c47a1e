"""A local HTTP server that records every request and answers with scripted JSON, for tests of outbound HTTP.

    with RecordingServer() as server:
        server.respond_sequence([(500, {"errcode": -1}), (200, {"errcode": 0, "errmsg": "ok"})])
        send_something_to(server.url + "/cgi-bin/webhook/send?key=k")
        assert server.wait_for(2)
        assert server.requests[1].json()["msgtype"] == "markdown"

It listens on 127.0.0.1 on a free port, serves each request in its own thread and closes every
connection after answering (HTTP/1.0), so leaving the `with` block never waits for a client.
Until told otherwise it answers 200 ``{"errcode": 0, "errmsg": "ok"}``, what the WeCom and
DingTalk robots answer on success.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

OK_BODY: dict[str, Any] = {"errcode": 0, "errmsg": "ok"}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, str]  # URL-decoded; a parameter given twice keeps its last value
    headers: dict[str, str]  # lower-case names; a header given twice has its values joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RecordingServer:
    """Records requests on 127.0.0.1 and answers them as scripted; use as a context manager."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._answers: list[tuple[int, dict[str, Any] | None]] = [(200, None)]
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. "http://127.0.0.1:40123" (no trailing slash)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests so far, in arrival order (a copy: later requests do not appear in it)."""
        with self._lock:
            return list(self._requests)

    def respond(self, status: int = 200, body: dict[str, Any] | None = None) -> None:
        """Answer the following requests with `status` and `body` (None: {"errcode": 0, "errmsg": "ok"})."""
        self.respond_sequence([(status, body)])

    def respond_sequence(self, answers: Sequence[tuple[int, dict[str, Any] | None]]) -> None:
        """Answer the following requests with `answers` in order, then keep repeating the last one."""
        if not answers:
            raise ValueError("respond_sequence needs at least one answer")
        with self._lock:
            self._answers = list(answers)

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least `n` requests have arrived; False when `timeout` seconds pass first."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._requests) >= n, timeout=timeout)

    def __enter__(self) -> RecordingServer:
        # A short poll interval: `shutdown` waits for the loop's next poll, 0.5 s by default, on every exit.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="recording-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _record(self, request: RecordedRequest) -> tuple[int, dict[str, Any] | None]:
        # Recording and picking the answer under one lock keeps the answer order equal to the arrival order.
        with self._lock:
            self._requests.append(request)
            answer = self._answers[0] if len(self._answers) == 1 else self._answers.pop(0)
            self._lock.notify_all()
            return answer


def _handler_for(server: RecordingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            parts = urlsplit(self.path)
            headers: dict[str, str] = {}
            for name, value in self.headers.items():
                key = name.lower()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            request = RecordedRequest(
                method=self.command,
                path=parts.path,
                query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                headers=headers,
                body=self._read_body(headers),
            )
            status, body = server._record(request)
            data = json.dumps(OK_BODY if body is None else body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self, headers: dict[str, str]) -> bytes:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(headers.get("content-length") or 0))

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass  # requests are in `server.requests`; stderr lines would only clutter pytest output

    return Handler
