"""A fault-injecting HTTP proxy for tests: it stands between the engine and a real server (moto's S3, Orthanc)
and, for the requests a rule matches, answers an error status, drops the connection or stalls, before letting
the rest through unchanged. The servers behind it stay real; only the network between is made to fail."""

from __future__ import annotations

import http.client
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


@dataclass
class Rule:
    """``times`` requests matching ``method`` (or any) and containing ``path_part`` get the fault: a
    ``status`` answer (with ``headers``), a dropped connection (``drop``), or ``stall_s`` of silence first."""

    times: int
    method: str | None = None
    path_part: str = ""
    status: int | None = None
    headers: dict | None = None
    drop: bool = False
    stall_s: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            (self.times < 0 or self.hits < self.times)
            and (self.method in (None, method))
            and self.path_part in path
        )


class _Server(ThreadingHTTPServer):
    """A client that hangs up mid-request (a run that stops while another of its threads waits on the store)
    is no error of the proxy's: no traceback on stderr, where the tests read the engine's own messages."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:9000") as proxy:`` then point clients at ``proxy.url``."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int | str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._take_rule(self.command, self.path)
                if rule is not None and rule.stall_s:
                    time.sleep(rule.stall_s)
                if rule is not None and rule.drop:
                    proxy._note(self.command, self.path, "dropped")
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if rule is not None and rule.status is not None:
                    proxy._note(self.command, self.path, rule.status)
                    payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(rule.status)
                    for key, value in (rule.headers or {}).items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a body after a HEAD answer would be read as the next answer
                        self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    proxy._note(self.command, self.path, answer.status)
                    self.send_response(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in HOP_BY_HOP:
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take_rule(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    return rule
        return None

    def _note(self, method: str, path: str, outcome: int | str) -> None:
        with self.lock:
            self.log.append((method, path, outcome))

    def inject(self, times: int, **fault) -> Rule:
        """Add a fault for the next ``times`` matching requests (-1: until :meth:`heal`)."""
        rule = Rule(times, **fault)
        with self.lock:
            self.rules.append(rule)
        return rule

    def heal(self) -> None:
        with self.lock:
            self.rules.clear()

    def injected(self) -> int:
        return sum(rule.hits for rule in self.rules)

    def count(self, predicate: Callable[[str, str, int | str], bool]) -> int:
        with self.lock:
            return sum(predicate(*entry) for entry in self.log)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
