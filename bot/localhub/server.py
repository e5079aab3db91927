"""The HTTP side of the local hub: connections, request bodies, streaming, LFS uploads.

Only the standard library (http.server, one thread per connection). A request's token is
checked before its body is read (an anonymous caller's body is read only by the few routes
that serve them); bodies are capped and a silent client times out (limits.py). Each request is
answered by the routes (api.py) under the store's lock, after the route's prepare step
(parsing cards and payloads) and except the streaming of file contents and of LFS uploads.
Faults (faults.py) are checked first, for every request.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bot.localhub import limits
from bot.localhub.api import Api
from bot.localhub.commits import check_upload
from bot.localhub.errors import ApiError
from bot.localhub.faults import Fault
from bot.localhub.limits import CHUNK
from bot.localhub.protocol import Query, Reply, error_reply, reply_json
from bot.localhub.store import Store

log = logging.getLogger("bot.localhub")


class Server(ThreadingHTTPServer):
    """The HTTP server: one thread per connection; remembers connections to close on stop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # parallel downloads open many connections at once

    def __init__(self, address: tuple[str, int], api: Api, faults: list[Fault] | None = None,
                 timeout: float = limits.TIMEOUT):
        self.api = api
        self.request_timeout = timeout  # seconds a client may stay silent
        self.faults = faults if faults is not None else []  # the hub's list, shared
        self.stopped = threading.Event()  # set by stop(): hanging requests end at once
        self.connections: set[socket.socket] = set()
        super().__init__(address, Handler)

    @property
    def stopping(self) -> bool:
        return self.stopped.is_set()

    @stopping.setter
    def stopping(self, value: bool) -> None:
        if value:
            self.stopped.set()
        else:
            self.stopped.clear()

    def close_connections(self) -> None:
        """Shut every open client connection (idle keep-alive ones included)."""
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Handler(BaseHTTPRequestHandler):
    """Reads a request, asks the Api for a Reply, writes it (HTTP/1.1, keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "safeguard-localhub"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms stalls
    server: Server

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # StreamRequestHandler sets it on the socket
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # ---- plumbing

    def _dispatch(self, method: str) -> None:
        if self.server.stopping:
            self.close_connection = True
            return
        self.late_fault: Fault | None = None  # a fault with `after`: answered once handled
        if self.server.faults and self._fault(method):
            return
        try:
            reply = self._answer(self.server.api, method)
        except (ConnectionError, TimeoutError):  # the client went away or fell silent
            self.close_connection = True
            return
        except ApiError as e:
            reply = error_reply(e)
        except Exception as e:  # a bug: answer it, log it, keep serving
            log.exception("local hub: %s %s failed", method, self.path)
            reply = reply_json({"error": f"local hub internal error: {type(e).__name__}: {e}"},
                               500, {"X-Error-Message": "local hub internal error"})
        if self.late_fault is not None:  # the request did its work; the client sees the fault
            reply = self._fault_reply(self.late_fault)
        self._send(reply, method)

    def _answer(self, api: Api, method: str) -> Reply:
        """The reply to the request: its token checked before its body is read."""
        url = urlsplit(self.path)
        query = Query(url.query)
        keep_alive = not self.close_connection
        self.close_connection = True  # until the body is read (or known to be empty)
        if limits.announced(self.headers) == 0:
            self.close_connection = not keep_alive
        if method == "PUT" and url.path.startswith("/lfs-upload/"):
            reply = self._upload(api, url.path, query)
            self.close_connection = not keep_alive
            return reply
        with api.store.lock:
            user = self._user(api.store)
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        handler, req = api.route(method, url.path, query, user, f"http://{host}",
                                 (self.headers.get("Content-Type") or "").lower(),
                                 self.headers.get("Range"))
        if api.reads_body(handler, user):
            req.body = self._read_body(api.body_limit(handler))
            self.close_connection = not keep_alive
        api.prepare(handler, req)
        with api.lock_for(handler):
            return handler(api, req)

    def _fault(self, method: str) -> bool:
        """Apply the first of the hub's faults that fires for this request; True when the
        request is done with (answered with an error, dropped, or cut short by stop)."""
        path = urlsplit(self.path).path
        fault = next((f for f in list(self.server.faults) if f.fires(method, path)), None)
        if fault is None:
            return False
        log.debug("%s fault %s injected on %s %s", self.address_string(), fault, method,
                  self.path)
        if fault.kind == "hang":  # then answer normally, unless the hub stops meanwhile
            if self.server.stopped.wait(fault.seconds):
                self.close_connection = True
                return True
            return False
        if fault.kind == "drop":  # no answer at all: the connection closes
            self.close_connection = True
            return True
        if fault.after:
            self.late_fault = fault
            return False
        try:
            self._read_body(limits.UPLOAD_BODY, lambda _: None)  # drained: usable again
        except (ApiError, OSError, ValueError):
            self.close_connection = True
        self._send(self._fault_reply(fault), method)
        return True

    def _fault_reply(self, fault: Fault) -> Reply:
        """The answer of a "status" fault: the status, a JSON error, and for 429 the Hub's
        rate-limit headers."""
        message = f"local hub fault: injected {fault.status}"
        headers = {"X-Error-Message": message}
        if fault.status == 429:  # the Hub's (huggingface_hub.utils.parse_ratelimit_headers)
            headers.update({"RateLimit": f'"api";r=0;t={fault.reset_seconds}',
                            "RateLimit-Policy": '"fixed window";"api";q=500;w=300',
                            "Retry-After": str(fault.reset_seconds)})
        reply = reply_json({"error": message}, fault.status, headers)
        if fault.status < 200 or fault.status in (204, 304):  # statuses that carry no body
            reply.body = b""
            self.close_connection = self.close_connection or fault.status < 200
        return reply

    def _user(self, store: Store) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, token = auth.partition(" ")
        user = store.user_for_token(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, "Invalid credentials in Authorization header")
        return user

    def _read_body(self, limit: int, sink: Any = None) -> bytes:
        """The request body, at most `limit` bytes; streamed into `sink` when given. The
        connection closes when it cannot be read whole."""
        try:
            return limits.read_body(self.rfile, self.headers, limit, sink)
        except ApiError:
            self.close_connection = True
            raise

    def _upload(self, api: Api, path: str, query: Query) -> Reply:
        """PUT of an LFS object: streamed to disk, hashed, checked against the signed oid."""
        oid, size, user = check_upload(api, path, query)
        digest = hashlib.sha256()
        f, tmp = api.store.blobs.new_upload()
        try:
            with f:
                def sink(data: bytes) -> None:
                    digest.update(data)
                    f.write(data)
                self._read_body(limits.UPLOAD_BODY, sink)
                written = f.tell()
            if digest.hexdigest() != oid or written != size:
                raise ApiError(400, f"uploaded content does not match oid {oid} and size {size}")
            with api.store.lock:
                api.store.blobs.finish_upload(tmp, oid)
                api.store.access.uploaded(user, oid)  # may now name it in a commit
        finally:
            Path(tmp).unlink(missing_ok=True)
        return Reply(200, b"", {"ETag": f'"{oid}"'})

    def _send(self, reply: Reply, method: str) -> None:
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                clean = str(value).replace("\r", " ").replace("\n", " ")
                self.send_header(name, clean.encode("latin-1", "replace").decode("latin-1")[:4000])
            length = reply.length if reply.file is not None else len(reply.body)
            self.send_header("Content-Length", str(length))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if method == "HEAD":
                return
            if reply.file is None:
                self.wfile.write(reply.body)
                return
            with open(reply.file, "rb") as f:
                f.seek(reply.offset)
                remaining = reply.length
                while remaining:
                    data = f.read(min(remaining, CHUNK))
                    if not data:
                        break
                    self.wfile.write(data)
                    remaining -= len(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

