"""A local HTTPS fake of the Vonage SMS API (``POST /sms/json``) for tests and manual runs.

Why a real server and not a mock: the gateway must be exercised through the real ``vonage`` SDK,
``requests`` and TLS, so retries, timeouts and error mapping are the ones production sees.

Usage::

    with VonageFake() as fake:                      # CA + cert from trustme, free port
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", fake.ca_path)
        gw = VonageGateway(fake.api_key, fake.api_secret, "NudgeFlow", rest_host=fake.host)
        fake.script(["throttle", "ok"])             # one behaviour per arriving request
        ...
        fake.requests[0].fields["client-ref"]

Behaviours (``script`` items, or ``default``): ``"ok"``; ``"throttle"`` (status 1); a Vonage
status as ``3`` or ``"status:3"``; ``"http429"`` / ``"http500"`` / ``"http:503"``; ``"close"``
(drop the connection without answering); ``"reset"`` (the same with a TCP reset);
``"delay:2.5"`` (answer ok after 2.5 s); ``"partial"`` (a 2+ part answer whose later parts are
throttled); ``"took:close"`` / ``"took:reset"`` / ``"took:truncate"`` (the text is taken like
``"ok"``, then the answer is lost: connection closed, reset, or cut after half the body); or a
``Reply`` for combinations. ``latency_s`` delays every answer.

Faults before any request (the request never leaves the client): ``with fake.refusing():``
(connections refused), ``fake.connection_fault = "stall_handshake"`` (TCP accepted, TLS never
answered) or ``"reset_handshake"`` (reset instead of the TLS handshake), and :class:`Blackhole`
(a port that drops connection attempts: connect timeouts). Run ``python -m
tests.fakes.vonage_fake`` for a standalone server.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import json
import math
import shutil
import signal
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import trustme

GSM_EXTENDED = set("^{}\\[~]|€\f")

STATUS_TEXTS: dict[int, str] = {
    1: "Throttled",
    2: "Missing params",
    3: "Invalid params",
    4: "Bad Credentials",
    5: "Internal Error",
    6: "Invalid Message",
    7: "Number Barred",
    8: "Partner Account Barred",
    9: "Partner Quota Violation",
    12: "Message Too Long",
    14: "Invalid Signature",
    15: "Invalid Sender Address",
    22: "Invalid Network Code",
    23: "Invalid Callback Url",
    29: "Non-Whitelisted Destination",
    33: "Number De-activated",
}


@dataclass(frozen=True)
class Reply:
    """What the fake does with one request.

    ``kind``: ``ok`` (normal processing, including credential and parameter checks),
    ``status`` (answer HTTP 200 with this Vonage status), ``http`` (answer this HTTP status),
    ``close`` (drop the connection), ``partial`` (multi-part answer, parts 2+ throttled).
    ``delay_s`` is waited before acting, on top of the fake's ``latency_s``. ``lose`` loses the
    answer after the request was processed (for ``ok``: the text was taken): ``close`` the
    connection without answering, ``reset`` it (TCP RST), or ``truncate`` the answer halfway.
    With ``kind="close"``, ``lose="reset"`` resets instead of closing.
    """

    kind: Literal["ok", "status", "http", "close", "partial"] = "ok"
    status: int = 0
    http_status: int = 200
    delay_s: float = 0.0
    lose: Literal["close", "reset", "truncate"] | None = None


Behaviour = str | int | Reply


def parse_behaviour(spec: Behaviour) -> Reply:
    """Turn a script item into a ``Reply``; unknown items raise ``ValueError`` at script time."""
    if isinstance(spec, Reply):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"not a behaviour: {spec!r}")
    if isinstance(spec, int):
        return Reply() if spec == 0 else Reply("status", status=spec)
    text = spec.strip().lower()
    if text == "ok":
        return Reply()
    if text in ("throttle", "throttled"):
        return Reply("status", status=1)
    if text == "close":
        return Reply("close")
    if text == "reset":
        return Reply("close", lose="reset")
    if text.startswith("took:"):
        lose = text.removeprefix("took:").strip()
        if lose not in ("close", "reset", "truncate"):
            raise ValueError(f"unknown fake Vonage behaviour: {spec!r}")
        return Reply(lose=lose)  # type: ignore[arg-type]
    if text == "partial":
        return Reply("partial")
    if text.startswith("status"):
        return parse_behaviour(int(text.removeprefix("status").lstrip(": ")))
    if text.startswith("http"):
        return Reply("http", http_status=int(text.removeprefix("http").lstrip(": ")))
    if text.startswith("delay"):
        return Reply(delay_s=float(text.removeprefix("delay").lstrip(": ")))
    raise ValueError(f"unknown fake Vonage behaviour: {spec!r}")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it (``fields``: form fields, last value wins)."""

    method: str
    path: str
    fields: dict[str, str]
    api_key: str | None
    auth: Literal["basic", "form", "none"]
    monotonic: float
    wall: float
    reply: Reply = field(default_factory=Reply)


def message_parts(text: str, unicode: bool) -> int:
    """Roughly how Vonage splits: GSM-7 160/153 (extended chars count 2), UCS-2 70/67."""
    if unicode:
        units = len(text.encode("utf-16-le")) // 2
        single, multi = 70, 67
    else:
        units = sum(2 if ch in GSM_EXTENDED else 1 for ch in text)
        single, multi = 160, 153
    return 1 if units <= single else math.ceil(units / multi)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: VonageFake

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake per connection thread, so a stalled client cannot block accept()."""
        fault = self.fake.connection_fault
        if fault == "stall_handshake":
            self.fake._stopping.wait(30.0)  # never answer the ClientHello
            return
        if fault == "reset_handshake":
            _reset(request)
            return
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.fake._ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.fake._note_error(f"handshake: {type(exc).__name__}: {exc}")
            return
        self.fake._track(tls, True)
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.fake._track(tls, False)
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.fake._note_error("unhandled error in request thread")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30  # idle keep-alive connections end eventually
    wbufsize = -1  # headers and body leave in one write (no Nagle / delayed-ACK stall)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._send_json(405, {"title": "Method Not Allowed"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        try:
            self.server.fake._handle(self)
        except (OSError, ssl.SSLError):
            self.close_connection = True  # the client went away (e.g. it timed out)

    def _send_json(
        self, code: int, body: dict[str, Any], lose: str | None = None, *, last: bool = False
    ) -> None:
        """Answer; ``lose`` ("close" / "reset" / "truncate") loses the answer instead.

        ``last`` ends the connection after a complete answer and says so (``Connection: close``),
        as HTTP/1.1 requires: a client that was not told would send its next request on a socket
        being closed under it, and could only report that as a possibly sent text."""
        if lose in ("close", "reset"):
            self.close_connection = True
            if lose == "reset":
                _reset(self.connection)
            return
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if last:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if lose == "truncate":
            self.close_connection = True
            data = data[: len(data) // 2]
        self.wfile.write(data)
        self.wfile.flush()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class VonageFake:
    """Threaded HTTPS fake of ``POST /sms/json`` with scripted behaviour and a request log."""

    def __init__(
        self,
        api_key: str = "fakekey1",
        api_secret: str = "fakesecret0123456",
        *,
        bind: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        price: str = "0.03330000",
        balance: str = "100.00000000",
        network: str = "12345",
    ) -> None:
        self.api_key = api_key
        self.api_secret = api_secret
        self.latency_s = latency_s
        self.price = Decimal(price)
        self.network = network
        self.default: Reply = Reply()
        # A fault on every new connection, before TLS: None, "stall_handshake", "reset_handshake".
        self.connection_fault: Literal["stall_handshake", "reset_handshake"] | None = None
        self._bind, self._port = bind, port
        self._balance = Decimal(balance)
        self._lock = threading.Condition()
        self._script: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._conns: set[ssl.SSLSocket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

        self._dir = Path(tempfile.mkdtemp(prefix="vonage-fake-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_path = str(self._dir / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        self._ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self._ssl_context)

    # lifecycle ---------------------------------------------------------------------------------

    def start(self) -> VonageFake:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self._bind, self._port), _Handler)
        server.fake = self
        self._server = server
        self._port = int(server.server_address[1])  # a restart keeps the port
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.name = f"vonage-fake-{self.port}"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections, wake delayed answers, drop the CA."""
        server, self._server = self._server, None
        self._stopping.set()
        if server is not None:
            server.shutdown()
            server.server_close()
        self._cut_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._cleanup()

    @contextmanager
    def refusing(self) -> Iterator[None]:
        """Refuse new connections (nothing listens on the port) for the ``with`` block.

        Open keep-alive connections are cut too, so every request in the block is refused."""
        server, self._server = self._server, None
        if server is None:
            raise RuntimeError("VonageFake is not started")
        server.shutdown()
        server.server_close()
        self._cut_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            yield
        finally:
            self.start()

    def _cut_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> VonageFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # addresses ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None and not self._port:
            raise RuntimeError("VonageFake is not started")
        return self._port

    @property
    def host(self) -> str:
        """``"127.0.0.1:PORT"``: what ``VonageGateway(rest_host=...)`` takes."""
        return f"{self._bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}/sms/json"

    def client_env(self) -> dict[str, str]:
        """Environment for a process (e.g. the dispatcher) that should send to this fake."""
        return {
            "REQUESTS_CA_BUNDLE": self.ca_path,
            "NUDGEFLOW_GATEWAY": "vonage",
            "NUDGEFLOW_VONAGE_REST_HOST": self.host,
            "NUDGEFLOW_VONAGE_API_KEY": self.api_key,
            "NUDGEFLOW_VONAGE_API_SECRET": self.api_secret,
        }

    # programming -------------------------------------------------------------------------------

    def script(self, behaviours: Iterable[Behaviour]) -> None:
        """Queue behaviours, one per arriving request; afterwards ``default`` applies."""
        replies = [parse_behaviour(b) for b in behaviours]
        with self._lock:
            self._script.extend(replies)

    def set_default(self, behaviour: Behaviour) -> None:
        self.default = parse_behaviour(behaviour)

    def reset(self) -> None:
        """Forget requests, script and errors; back to answering ``ok``."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self.errors.clear()
            self.default = Reply()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, n: int, timeout_s: float = 10.0) -> list[RecordedRequest]:
        """Block until at least ``n`` requests arrived; raise ``TimeoutError`` otherwise."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._requests) >= n, timeout=timeout_s):
                raise TimeoutError(f"fake saw {len(self._requests)} of {n} requests")
            return list(self._requests)

    # request handling --------------------------------------------------------------------------

    def _note_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _track(self, conn: ssl.SSLSocket, alive: bool) -> None:
        with self._lock:
            (self._conns.add if alive else self._conns.discard)(conn)

    def _handle(self, h: _Handler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        fields = self._parse_body(h.headers.get("Content-Type", ""), raw)
        api_key, secret, auth = self._credentials(h.headers.get("Authorization"), fields)
        path = h.path.split("?", 1)[0]
        with self._lock:
            reply = self._script.popleft() if self._script else self.default
            self._requests.append(
                RecordedRequest(
                    method="POST",
                    path=path,
                    fields=fields,
                    api_key=api_key,
                    auth=auth,
                    monotonic=time.monotonic(),
                    wall=time.time(),
                    reply=reply,
                )
            )
            self._lock.notify_all()

        wait = self.latency_s + reply.delay_s
        if wait > 0 and self._stopping.wait(wait):
            h.close_connection = True
            return
        if path != "/sms/json":
            h._send_json(404, {"title": "Not Found", "detail": f"no route {path}"})
            return
        lose = reply.lose
        if reply.kind == "close":
            h._send_json(0, {}, lose="reset" if lose == "reset" else "close")
            return
        if reply.kind == "http":
            # A 5xx ends the connection, announced, so the client opens a new one for its retry.
            last = reply.http_status >= 500
            h._send_json(reply.http_status, _http_error_body(reply.http_status), lose, last=last)
            return
        if api_key != self.api_key or secret != self.api_secret:
            h._send_json(200, _error(4), lose)
            return
        for name in ("to", "from", "text"):
            if not fields.get(name):
                h._send_json(200, _error(2, f"Missing {name} param"), lose)
                return
        if reply.kind == "status" and reply.status != 0:
            h._send_json(200, _error(reply.status), lose)
            return
        h._send_json(200, self._accept(fields, partial=reply.kind == "partial"), lose)

    @staticmethod
    def _parse_body(content_type: str, raw: bytes) -> dict[str, str]:
        if "json" in content_type:
            try:
                data = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return {}
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        parsed = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[-1] for k, v in parsed.items()}

    @staticmethod
    def _credentials(
        header: str | None, fields: dict[str, str]
    ) -> tuple[str | None, str | None, Literal["basic", "form", "none"]]:
        if header and header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None, None, "basic"
            key, _, secret = decoded.partition(":")
            return key, secret, "basic"
        if "api_key" in fields:
            return fields.get("api_key"), fields.get("api_secret"), "form"
        return None, None, "none"

    def _accept(self, fields: dict[str, str], partial: bool) -> dict[str, Any]:
        parts = message_parts(fields["text"], fields.get("type") == "unicode")
        if partial:
            parts = max(parts, 2)
        messages = []
        with self._lock:
            for i in range(parts):
                if partial and i > 0:
                    messages.append({"to": fields["to"], "status": "1", "error-text": "Throttled"})
                    continue
                self._balance -= self.price
                msg = {
                    "to": fields["to"],
                    "message-id": f"FAKE{next(self._ids):012X}",
                    "status": "0",
                    "remaining-balance": str(self._balance),
                    "message-price": str(self.price),
                    "network": self.network,
                }
                if "client-ref" in fields:
                    msg["client-ref"] = fields["client-ref"]
                messages.append(msg)
        return {"message-count": str(parts), "messages": messages}


class Blackhole:
    """A local port that never completes a TCP handshake: clients hit their connect timeout.

    A listener with a zero backlog that never accepts, its queue filled by a few connections of
    its own: Linux then drops further SYNs, as a firewall or an unreachable host would.
    ``host`` is ``"127.0.0.1:PORT"`` like :attr:`VonageFake.host`.
    """

    def __init__(self, bind: str = "127.0.0.1") -> None:
        self._listener = socket.socket()
        self._listener.bind((bind, 0))
        self._listener.listen(0)
        self._fillers: list[socket.socket] = []
        self.host = f"{bind}:{self._listener.getsockname()[1]}"
        address = self._listener.getsockname()
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.2)
            try:
                filler.connect(address)
            except OSError:
                filler.close()
                return  # the queue is full: SYNs are dropped from now on
            self._fillers.append(filler)
        self.close()
        raise RuntimeError("could not fill the listen queue; connect timeouts not reproducible")

    def close(self) -> None:
        for sock in (*self._fillers, self._listener):
            sock.close()
        self._fillers.clear()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error(status: int, text: str | None = None) -> dict[str, Any]:
    return {
        "message-count": "1",
        "messages": [{"status": str(status), "error-text": text or STATUS_TEXTS.get(status, "")}],
    }


def _http_error_body(code: int) -> dict[str, Any]:
    titles = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
    return {
        "type": f"https://developer.nexmo.com/api-errors#{code}",
        "title": titles.get(code, "Error"),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the fake until Ctrl-C and print what a client needs to reach it."""
    parser = argparse.ArgumentParser(description="Local HTTPS fake of the Vonage SMS API")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="fakekey1")
    parser.add_argument("--api-secret", default="fakesecret0123456")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    parser.add_argument(
        "--script", default="", help="comma-separated behaviours, e.g. throttle,ok,http500"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean stop (temp CA) on TERM
    fake = VonageFake(args.api_key, args.api_secret, port=args.port, latency_s=args.latency)
    fake.script([s for s in args.script.split(",") if s.strip()])
    with fake:
        print(f"fake Vonage SMS API on {fake.url}", flush=True)
        for key, value in fake.client_env().items():
            print(f"export {key}={value}", flush=True)
        seen = 0
        try:
            while True:
                time.sleep(0.5)
                reqs = fake.requests
                for r in reqs[seen:]:
                    ref = r.fields.get("client-ref")
                    print(f"POST {r.path} client-ref={ref} -> {r.reply}", flush=True)
                seen = len(reqs)
        except KeyboardInterrupt:
            print(f"stopping after {seen} request(s)", flush=True)


if __name__ == "__main__":
    main()
