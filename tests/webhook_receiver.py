"""A webhook receiver for the tests: a real HTTP server on a loopback thread.

What it answers depends on the path the delivery's URL names:

- ``/ok``: 204 at once;
- ``/slow/<ms>``: 200 after that many milliseconds;
- ``/fail/<n>``: 500 for the first ``n`` requests of a delivery, then 200;
- ``/throttle/<seconds>``: 429 with ``Retry-After: <seconds>`` the first time, then 200;
- ``/gone``: 410;
- ``/nul``: 502 with a NUL byte in its body;
- ``/hang``: answers nothing for 30 s (past any client timeout);
- ``/hang-once``: hangs on a delivery's first request, 200 on the later ones.

It records every request (path, headers, raw body, when it began and ended)
and, per session (the payload's ``session_id``), how many were in flight at
once, so that tests can check order and concurrency.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    started: float
    ended: float = 0.0
    status: int = 0

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """The server and what it has seen."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: Counter[str] = field(default_factory=Counter)  # per delivery id
    in_flight: Counter[str] = field(default_factory=Counter)  # per session
    most_in_flight: Counter[str] = field(default_factory=Counter)  # per session
    most_overall: int = 0
    stop_hanging: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.stop_hanging.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """Until ``count`` requests have been answered; what was received."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                done = [r for r in self.received if r.ended]
                if len(done) >= count:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"{count} requests expected, {len(self.received)} received")


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            record = Received(self.path, dict(self.headers.items()), body, time.monotonic())
            try:
                session = str(json.loads(body).get("session_id"))
            except ValueError:
                session = "?"
            delivery = self.headers.get("X-ZapHub-Delivery", "?")
            with receiver.lock:
                receiver.received.append(record)
                receiver.attempts[delivery] += 1
                attempt = receiver.attempts[delivery]
                receiver.in_flight[session] += 1
                receiver.most_in_flight[session] = max(
                    receiver.most_in_flight[session], receiver.in_flight[session]
                )
                receiver.most_overall = max(receiver.most_overall, sum(receiver.in_flight.values()))
            try:
                status, headers = self._answer(attempt)
            finally:
                with receiver.lock:
                    receiver.in_flight[session] -= 1
            record.status = status
            body = b"bad\x00gateway" if self.path.startswith("/nul") else b""
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            record.ended = time.monotonic()

        def _answer(self, attempt: int) -> tuple[int, dict[str, str]]:
            parts = self.path.strip("/").split("/")
            kind, argument = parts[0], parts[1] if len(parts) > 1 else "0"
            if kind == "ok":
                return 204, {}
            if kind == "slow":
                time.sleep(int(argument) / 1000)
                return 200, {}
            if kind == "fail":
                return (500, {}) if attempt <= int(argument) else (200, {})
            if kind == "throttle":
                return (429, {"Retry-After": argument}) if attempt == 1 else (200, {})
            if kind == "nul":  # a 502 whose body holds a NUL byte
                return 502, {}
            if kind == "gone":
                return 410, {}
            if kind == "hang" or (kind == "hang-once" and attempt == 1):
                receiver.stop_hanging.wait(30)
                return 200, {}
            if kind == "hang-once":
                return 200, {}
            return 404, {}

    return Handler


def start_receiver(port: int = 0) -> Receiver:
    """A receiver listening on 127.0.0.1 (``port`` 0: any free one), serving on a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), BaseHTTPRequestHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    receiver = Receiver(server, thread)
    server.RequestHandlerClass = _handler(receiver)
    thread.start()
    return receiver
