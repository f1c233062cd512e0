"""A real HTTP(S) image host on 127.0.0.1 for the fetcher's tests, with faults on chosen paths.

It serves `files` (name -> bytes) with an ETag and a Last-Modified, answers conditional requests with 304, and
records every request: when it arrived, how many were in flight, which conditional headers it carried, and the
body bytes sent, so tests assert the per-host limits and the bytes an unchanged run moves. Every fault ends by
itself (a slow answer sleeps a bounded time, an endless body stops at its size or when the client leaves).
A request counts as in flight until the server is done with it, which for one the client gave up on (a
timeout, a refused body) is a little after the client left: limits are asserted on hosts without those.

Paths:
  /img/NAME                  the file (304 when If-None-Match or If-Modified-Since still holds)
  /as/TYPE/SUBTYPE/NAME      the file with that Content-Type
  /status/CODE               that status, a small HTML body
  /fail/N/CODE/NAME          CODE (with `Retry-After: 1` for 429 and 503) for the first N requests, then the file
  /slow/SECONDS/NAME         the file after sleeping SECONDS before the headers
  /drip/N                    N bytes, one every 0.2 s, with their Content-Length
  /unasked/NAME              304 whatever the request says
  /short/NAME                a Content-Length of twice the file, half of it sent, then the connection closed
  /huge/MB                   MB megabytes of zeros with their Content-Length
  /endless/MB                MB megabytes of zeros without a Content-Length (connection-close framing)
  /redirect/N/NAME           N redirects, then the file
  /loop/A                    302 to /loop/B, which 302s back to /loop/A
  /to?url=URL                302 to URL (anywhere, any scheme)
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import ssl
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

LAST_MODIFIED = email.utils.formatdate(1_700_000_000, usegmt=True)
MB = 1024 * 1024


@dataclass
class Log:
    """What the server saw; guarded by `lock`."""

    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each request
    paths: Counter[str] = field(default_factory=Counter)
    conditional: int = 0  # requests that carried If-None-Match or If-Modified-Since
    not_modified: int = 0  # 304 answers
    body_bytes: int = 0  # body bytes written
    in_flight: int = 0
    max_in_flight: int = 0
    user_agents: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def max_per_window(self, window: float = 1.0) -> int:
        """The most requests that arrived within any `window` seconds (half-open)."""
        times, most, start = sorted(self.arrivals), 0, 0
        for end, t in enumerate(times):
            while times[start] <= t - window:
                start += 1
            most = max(most, end - start + 1)
        return most


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet about clients that hang up (the fetcher does, on refused bodies and timeouts)."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class FaultServer:
    """Serves `files` on 127.0.0.1 (https with `certificate`, a trustme LeafCert); `url(path)` names one."""

    def __init__(self, files: dict[str, bytes], certificate: object | None = None):
        self.files = dict(files)
        self.log = Log()
        self._failures: Counter[str] = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server._enter(self)
                try:
                    server._route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: expected for refused bodies
                finally:
                    server._leave()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._http = _Server(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if certificate is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            certificate.configure_cert(context)  # type: ignore[attr-defined]
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._http.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{path}"

    def etag(self, name: str) -> str:
        return '"' + hashlib.sha256(self.files[name]).hexdigest()[:16] + '"'

    def reset_log(self) -> None:
        self.log = Log()

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _enter(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        log = self.log
        with log.lock:
            log.arrivals.append(time.monotonic())
            log.paths[urlsplit(handler.path).path] += 1
            log.in_flight += 1
            log.max_in_flight = max(log.max_in_flight, log.in_flight)
            log.user_agents.add(handler.headers.get("User-Agent", ""))
            if handler.headers.get("If-None-Match") or handler.headers.get("If-Modified-Since"):
                log.conditional += 1

    def _leave(self) -> None:
        with self.log.lock:
            self.log.in_flight -= 1

    def _sent(self, n: int) -> None:
        with self.log.lock:
            self.log.body_bytes += n

    # -- answers ------------------------------------------------------------------------------------------

    def _route(self, h: http.server.BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        kind, *rest = parts.path.strip("/").split("/")
        if kind == "img":
            self._file(h, rest[0])
        elif kind == "as":
            self._file(h, rest[2], content_type=f"{rest[0]}/{rest[1]}")
        elif kind == "status":
            self._plain(h, int(rest[0]))
        elif kind == "fail":
            n, code, name = int(rest[0]), int(rest[1]), rest[2]
            with self.log.lock:
                self._failures[parts.path] += 1
                failing = self._failures[parts.path] <= n
            if failing:
                self._plain(h, code, {"Retry-After": "1"} if code in (429, 503) else {})
            else:
                self._file(h, name)
        elif kind == "slow":
            time.sleep(float(rest[0]))
            self._file(h, rest[1])
        elif kind == "drip":
            h.send_response(200)
            h.send_header("Content-Length", rest[0])
            h.end_headers()
            for _ in range(int(rest[0])):
                h.wfile.write(b"\0")
                h.wfile.flush()
                self._sent(1)
                time.sleep(0.2)
        elif kind == "unasked":
            h.send_response(304)
            h.end_headers()
        elif kind == "short":
            data = self.files[rest[0]]
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(2 * len(data)))
            h.end_headers()
            h.wfile.write(data)
            self._sent(len(data))
            h.close_connection = True
        elif kind in ("huge", "endless"):
            self._zeros(h, int(rest[0]) * MB, with_length=kind == "huge")
        elif kind == "redirect":
            n, name = int(rest[0]), rest[1]
            self._redirect(h, f"/redirect/{n - 1}/{name}" if n > 1 else f"/img/{name}", 301)
        elif kind == "loop":
            self._redirect(h, "/loop/B" if rest[0] == "A" else "/loop/A", 302)
        elif kind == "to":
            self._redirect(h, parse_qs(parts.query)["url"][0], 302)
        else:
            self._plain(h, 404)

    def _file(self, h: http.server.BaseHTTPRequestHandler, name: str, content_type: str = "image/png") -> None:
        if name not in self.files:
            self._plain(h, 404)
            return
        etag = self.etag(name)
        match = h.headers.get("If-None-Match")
        since = h.headers.get("If-Modified-Since")
        if (match is not None and match == etag) or (match is None and since == LAST_MODIFIED):
            with self.log.lock:
                self.log.not_modified += 1
            h.send_response(304)
            h.send_header("ETag", etag)
            h.end_headers()
            return
        data = self.files[name]
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", etag)
        h.send_header("Last-Modified", LAST_MODIFIED)
        h.end_headers()
        h.wfile.write(data)
        self._sent(len(data))

    def _plain(self, h: http.server.BaseHTTPRequestHandler, code: int, headers: dict[str, str] | None = None) -> None:
        body = f"<html><body>error {code}</body></html>".encode()
        h.send_response(code)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Type", "text/html")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        self._sent(len(body))

    def _redirect(self, h: http.server.BaseHTTPRequestHandler, location: str, code: int) -> None:
        h.send_response(code)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _zeros(self, h: http.server.BaseHTTPRequestHandler, size: int, with_length: bool) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        if with_length:
            h.send_header("Content-Length", str(size))
        else:
            h.close_connection = True
        h.end_headers()
        chunk, left = b"\0" * (256 * 1024), size
        while left > 0:
            h.wfile.write(chunk[: min(left, len(chunk))])
            self._sent(min(left, len(chunk)))
            left -= len(chunk)


def write_ca(tmp_path: Path) -> tuple[object, Path]:
    """A private CA (trustme) with a certificate for 127.0.0.1, and the CA's PEM file for fetch.ca_bundle."""
    import trustme

    ca = trustme.CA()
    pem = tmp_path / "test-ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return ca.issue_cert("127.0.0.1"), pem
