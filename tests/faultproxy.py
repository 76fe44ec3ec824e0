"""Fault injection for tests: real servers and real processes, on loopback only.

* :class:`FaultProxy`: an HTTP reverse proxy in front of a real STAC API (``rustac serve``)
  that answers part of the requests with 5xx/429, hangs past the client's timeout or drops the
  connection, following a fixed schedule, and forwards the rest. It is bounded in requests and
  in time and stops by itself, so a broken test can never leave it running.
* :class:`SignedFileServer`: serves files with HTTP range requests (as GDAL's ``/vsicurl/``
  reads COGs) only to URLs carrying the right ``?sig=`` token, like a SAS-signed blob store.
* :func:`sas_signer` / :func:`gated_signer`: module-level URL signers (signers travel to
  workers by reference), configured through environment variables so that CLI subprocesses
  and worker processes pick them up.
* :class:`KillOnExecute`: a worker plugin that parks a worker's event loop when it starts the
  N-th task and records the worker's pid, so a test can SIGKILL that worker from outside
  while the task is running.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from distributed.diagnostics.plugin import WorkerPlugin

if TYPE_CHECKING:
    from typing_extensions import Self

Fault = str | int  # "ok", "timeout", "reset" or an HTTP status code

# Hop-by-hop and length headers are recomputed by the proxy.
_SKIP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


@dataclass
class Record:
    """One request the proxy saw and what it did with it."""

    method: str
    path: str
    fault: Fault
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultProxy:
    """A reverse proxy on ``127.0.0.1`` that injects faults on a fixed, cycling schedule.

    Parameters
    ----------
    upstream
        Base URL of the real server (``http://127.0.0.1:PORT``).
    schedule
        Faults applied to successive requests, cycling: ``"ok"`` forwards, an int answers with
        that status, ``"timeout"`` holds the request for ``hang_s`` then closes it unanswered,
        ``"reset"`` closes the connection at once.
    hang_s
        How long a ``"timeout"`` holds a request (set it above the client's timeout).
    max_requests
        After this many requests every answer is 503 ``budget exhausted`` (bounds a client
        stuck in a retry loop).
    max_seconds
        The proxy shuts itself down after this long, whatever happens.
    """

    def __init__(self, upstream: str, schedule: Sequence[Fault] = ("ok",), *, hang_s: float = 2.0,
                 max_requests: int = 500, max_seconds: float = 120.0) -> None:
        self.upstream = upstream.rstrip("/")
        self._schedule = itertools.cycle(list(schedule))
        self.hang_s = hang_s
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._threads: list[threading.Thread] = []

    # -- what happened -------------------------------------------------------------------------
    def count(self, fault: Fault | None = None) -> int:
        """Requests seen (with ``fault`` given: those answered with that fault)."""
        with self._lock:
            return sum(1 for r in self.records if fault is None or r.fault == fault)

    @property
    def injected(self) -> int:
        """Requests that were not forwarded."""
        with self._lock:
            return sum(1 for r in self.records if r.fault != "ok")

    # -- life cycle ----------------------------------------------------------------------------
    def __enter__(self) -> Self:
        serve = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        watchdog = threading.Thread(target=self._watchdog, daemon=True)
        self._threads = [serve, watchdog]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._server.shutdown()
            self._server.server_close()

    def _watchdog(self) -> None:
        if not self._stop.wait(self.max_seconds):
            self.stop()

    def _next_fault(self, handler: BaseHTTPRequestHandler) -> Fault:
        with self._lock:
            fault: Fault = next(self._schedule) if len(self.records) < self.max_requests else "budget"
            self.records.append(Record(handler.command, handler.path, fault, dict(handler.headers.items())))
            return fault

    # -- the handler ---------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._next_fault(self)
                if fault == "timeout":
                    proxy._stop.wait(proxy.hang_s)  # longer than the client waits; bounded
                    self.close_connection = True
                    return
                if fault == "reset":
                    self.close_connection = True
                    # Linger 0: closing sends RST, as a crashed server or a dropped route would.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if fault == "budget":
                    self._reply(503, b'{"error": "fault proxy budget exhausted"}', [("Content-Type", "application/json")])
                    return
                if isinstance(fault, int):
                    extra = [("Retry-After", "0")] if fault in (429, 503) else []
                    msg = json.dumps({"code": fault, "description": "injected by FaultProxy"}).encode()
                    self._reply(fault, msg, [("Content-Type", "application/json"), *extra])
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                up = urlsplit(proxy.upstream)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _SKIP_HEADERS}
                    headers["Accept-Encoding"] = "identity"
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    # Absolute links (next pages, search endpoint) must lead back through us.
                    data = data.replace(proxy.upstream.encode(), proxy.url.encode())
                    keep = [(k, v) for k, v in resp.getheaders() if k.lower() not in _SKIP_HEADERS]
                    self._reply(resp.status, data, keep)
                finally:
                    conn.close()

            do_GET = do_POST = do_HEAD = _handle

        return Handler


class SignedFileServer:
    """Serve the files of ``folder`` over HTTP with range requests, only to signed URLs.

    A request must carry ``?sig=TOKEN`` (else 403), as a SAS-signed blob store would; every
    request path is recorded, so a test can prove the signed URL was really used.
    """

    def __init__(self, folder: str | os.PathLike[str], token: str, *, max_seconds: float = 300.0) -> None:
        self.folder = Path(folder)
        self.token = token
        self.requests: list[str] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.max_seconds = max_seconds
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        threading.Thread(target=self._watchdog, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._server.shutdown()
            self._server.server_close()

    def _watchdog(self) -> None:
        if not self._stop.wait(self.max_seconds):
            self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                with srv._lock:
                    srv.requests.append(self.path)
                if f"sig={srv.token}" not in parts.query.split("&"):
                    with srv._lock:
                        srv.refused += 1
                    self._send(403, b"signature required")
                    return
                path = srv.folder / Path(parts.path).name
                if not path.is_file():
                    self._send(404, b"not found")
                    return
                data = path.read_bytes()
                rng = self.headers.get("Range")
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
                if m:
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                    if start >= len(data):
                        self._send(416, b"", [("Content-Range", f"bytes */{len(data)}")])
                        return
                    self._send(206, data[start:end + 1], [("Content-Range", f"bytes {start}-{end}/{len(data)}"),
                                                          ("Accept-Ranges", "bytes")])
                else:
                    self._send(200, data, [("Accept-Ranges", "bytes")])

            def _send(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "image/tiff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _handle

        return Handler


# -- signers (module-level: they travel to workers by reference) ----------------------------------
SAS_BASE_ENV = "ICEMAP_TEST_SAS_BASE"
SAS_TOKEN_ENV = "ICEMAP_TEST_SAS_TOKEN"
SAS_LOG_ENV = "ICEMAP_TEST_SAS_LOG"
GATE_ENV = "ICEMAP_TEST_GATE"


def sas_signer(href: str) -> str:
    """Sign like a blob store: ``https://host/.../NAME`` -> ``{base}/NAME?sig={token}``.

    The base URL and token come from the environment (as real signers read credentials), so
    neither is in the graph; each call is appended to the file named by ``ICEMAP_TEST_SAS_LOG``
    (if set), which lets a test check that signing happened on the workers, at read time.
    """
    base, token = os.environ[SAS_BASE_ENV], os.environ[SAS_TOKEN_ENV]
    log = os.environ.get(SAS_LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {Path(urlsplit(href).path).name}\n")
    return f"{base}/{quote(Path(urlsplit(href).path).name)}?sig={token}"


def gated_signer(href: str) -> str:
    """A signer that returns ``href`` unchanged, but blocks while a gate file exists.

    ``ICEMAP_TEST_GATE="GATE_FILE|SUB1,SUB2"`` blocks opens of hrefs containing any SUBn for as
    long as GATE_FILE exists (at most 120 s), so a test can hold an ingest between two time
    steps deterministically and kill it there. Unset: a no-op signer.
    """
    spec = os.environ.get(GATE_ENV)
    if spec:
        gate, _, subs = spec.partition("|")
        if any(s and s in href for s in subs.split(",")):
            deadline = time.monotonic() + 120
            while os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.05)
    return href


# -- a worker plugin that gets a worker killed mid-task -------------------------------------------
class KillOnExecute(WorkerPlugin):
    """Worker plugin: at the ``nth`` task this worker starts executing, park the worker.

    Exactly one worker of the cluster triggers (an exclusive marker file decides): it writes its
    pid into ``marker`` and blocks its event loop for up to ``hold_s`` seconds, during which the
    test SIGKILLs it from outside. The nanny then starts a fresh worker, which sees the marker
    and stays inert, and the scheduler reschedules the lost tasks.
    """

    name = "icemap-test-kill-on-execute"
    idempotent = True

    def __init__(self, marker: str, nth: int = 3, prefixes: Sequence[str] = (), hold_s: float = 60.0) -> None:
        self.marker = marker
        self.nth = nth
        self.prefixes = tuple(prefixes)
        self.hold_s = hold_s
        self._seen = 0

    def setup(self, worker: Any) -> None:
        self._seen = 0

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing" or os.path.exists(self.marker):
            return
        name = key[0] if isinstance(key, tuple) else str(key)
        if self.prefixes and not str(name).startswith(self.prefixes):
            return
        self._seen += 1
        if self._seen < self.nth:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {name}\n")
        time.sleep(self.hold_s)  # the test kills this process meanwhile


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail clearly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


#: The secret the leaky signers below plant (tests grep every output for it).
LEAKY_TOKEN = "LEAKY-t0ken-5ecret-91c2"


def leaky_signer(href: str) -> str:
    """A signer that fails quoting its token, as real SDKs do in their exception text."""
    raise PermissionError(f"403 Forbidden for {href}?sv=2024-01-01&sig={LEAKY_TOKEN} (token={LEAKY_TOKEN})")


def appending_signer(href: str) -> str:
    """A signer that appends a SAS query to any href, ``file://`` and local paths included."""
    return f"{href}?sv=2024-01-01&sig={LEAKY_TOKEN}"
