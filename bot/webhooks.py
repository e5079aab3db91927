"""Hub webhooks: `safeguard-bot serve-webhooks` queues each new model revision in the ledger.

The Hub POSTs a JSON payload on every event of the repos a webhook watches
(https://huggingface.co/docs/hub/webhooks). For a repo event on a model (`event.scope` "repo" or
"repo.content", `event.action` "create" or "update") the server queues (`repo.name`,
`repo.headSha`) in the ledger and answers at once; the worker (`run --once`, `watch`) claims it
later and checks it like a discovered candidate (watched base, license, size...).

Answers (JSON; nothing is queued unless 202):
    202 {"queued": true|false, "repo", "revision"}   queued, or already in the ledger
    200 {"ignored": why}                              another event, repo type or branch
    400 malformed payload, 401 missing or wrong X-Webhook-Secret, 404 other path,
    405 other method, 411 no Content-Length, 413 body over webhooks.max_body_bytes,
    503 the ledger failed (the Hub may replay it)

One JSON log line per request (status, repo, revision, outcome); never the secret, the headers
or the query string. Standard library HTTP only: put a TLS-terminating proxy in front of it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bot.config import Settings
from bot.errors import LedgerError, UsageError
from bot.hub import is_repo_id

SECRET_ENV = "SAFEGUARD_WEBHOOK_SECRET"
SECRET_HEADER = "X-Webhook-Secret"
SCOPES = ("repo", "repo.content")  # repo events; repo.config and discussions are ignored
ACTIONS = ("create", "update")  # delete and move queue nothing
MAIN_REF = "refs/heads/main"  # repo.headSha is this branch's head
SHA = re.compile(r"[0-9a-f]{40}")
REQUEST_TIMEOUT_S = 10  # a client silent this long mid-request is dropped
LINGER_S = 1.0  # after refusing a body unread, read it away this long so the answer arrives
SHOWN = 80  # the most characters of a payload value quoted in an error

Log = Callable[[str], None]
_logger = logging.getLogger("bot.webhooks")


@dataclass(frozen=True)
class RepoUpdate:
    """A model repo event that names a revision to process."""

    repo: str
    revision: str
    scope: str
    action: str


class _Refused(Exception):
    """A request answered with an error status (internal: never leaves this module); `detail`
    goes to the log line only."""

    def __init__(self, status: int, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


def resolve_secret(settings: Settings) -> str:
    """The webhook secret: `webhooks.secret`, else $SAFEGUARD_WEBHOOK_SECRET; UsageError if
    neither is set (the server never runs open) or it is not ASCII (the Hub's rule)."""
    secret = settings.webhooks.secret or os.environ.get(SECRET_ENV) or ""
    if not secret.strip():
        raise UsageError(f"serve-webhooks needs the webhook's secret: set {SECRET_ENV} (or "
                         "webhooks.secret in the config) to the secret of the webhook on the Hub")
    if not secret.isascii():
        raise UsageError("the webhook secret must be ASCII (the Hub sends only ASCII secrets)")
    return secret


def parse_payload(body: bytes) -> RepoUpdate | str:
    """A Hub webhook payload -> the model revision to queue, or why it is ignored.

    Raises _Refused(400) for a body that is not a payload: not JSON, a field missing or of the
    wrong type, a repo name or head sha of the wrong form.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, absurd nesting
        raise _Refused(400, "the body is not JSON") from None
    payload = _object(payload, "the payload")
    event = _object(payload.get("event"), "event")
    repo = _object(payload.get("repo"), "repo")
    scope, action = _text(event, "scope", "event"), _text(event, "action", "event")
    kind, name = _text(repo, "type", "repo"), _text(repo, "name", "repo")
    refs = payload.get("updatedRefs")
    if refs is not None and not (isinstance(refs, list)
                                 and all(isinstance(r, dict) and isinstance(r.get("ref"), str)
                                         for r in refs)):
        raise _Refused(400, "updatedRefs must be a list of objects with a string 'ref'")
    if scope not in SCOPES:
        return f"event scope {_show(scope)} is not a repo update"
    if action not in ACTIONS:
        return f"event action {_show(action)}: only create and update name a new revision"
    if kind != "model":
        return f"a {_show(kind)} repo: only models are merged"
    sha = repo.get("headSha")
    if not isinstance(sha, str):
        raise _Refused(400, "repo.headSha is missing or not a string")
    if not SHA.fullmatch(sha):
        raise _Refused(400, f"repo.headSha {_show(sha)} is not a 40-digit commit sha")
    if not is_repo_id(name):
        raise _Refused(400, f"repo.name {_show(name)} is not a Hub repo id")
    if scope == "repo.content" and refs \
            and not any(r["ref"] == MAIN_REF and r.get("newSha") for r in refs):
        shown = ", ".join(_show(r["ref"]) for r in refs[:5])
        return f"no new commit on main (updated: {shown})"
    return RepoUpdate(name, sha, scope, action)


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise _Refused(400, f"{what} must be a JSON object")
    return value


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _Refused(400, f"{where}.{key} is missing or not a string")
    return value


def _cut(value: str) -> str:
    """A client's value cut to SHOWN characters, for messages and log lines."""
    return value if len(value) <= SHOWN else value[:SHOWN] + "..."


def _show(value: str) -> str:
    return repr(_cut(value))


class WebhookServer:
    """An HTTP server that queues Hub webhook events in the ledger, in background threads.

    Args:
        settings: `webhooks` (path, max_body_bytes) and `ledger` (its URL) are used.
        workdir: the ledger is WORKDIR/ledger.sqlite unless `ledger.url` is set.
        secret: what the X-Webhook-Secret header must be (`resolve_secret`).
        host, port: where to listen; port 0 takes a free port.
        log: gets one JSON line per request (default: the `bot.webhooks` logger).
    """

    def __init__(self, settings: Settings, workdir: str | os.PathLike, secret: str,
                 host: str = "127.0.0.1", port: int = 8080, log: Log | None = None) -> None:
        if not secret or not secret.strip() or not secret.isascii():
            raise UsageError("the webhook server needs a non-empty ASCII secret")
        self.settings = settings
        self.workdir = Path(workdir)
        self.host, self.port = host, port
        self.log = log or _logger.info
        self._secret = secret.encode("ascii")
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.ledger = None

    def __repr__(self) -> str:  # never the secret
        where = self.url if self._server else f"{self.host}:{self.port}, stopped"
        return f"WebhookServer({where})"

    def start(self) -> WebhookServer:
        """Open the ledger and serve in a background thread. Returns self."""
        from bot.pipeline import open_ledger

        if self._server is not None:
            raise UsageError(f"the webhook server is already serving at {self.url}")
        self.ledger = open_ledger(self.settings, self.workdir)
        server_class = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            self._server = server_class((self.host, self.port), _Handler)
        except OSError as e:
            self.ledger.close()
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}; "
                             "choose another --host or --port") from e
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"webhooks:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (requests in flight finish) and close the ledger."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT_S)
            self._thread = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    @property
    def url(self) -> str:
        """The webhook's URL, e.g. http://127.0.0.1:8080/webhooks/hub."""
        if self._server is None:
            raise UsageError("the webhook server is not serving; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.settings.webhooks.path}"

    def __enter__(self) -> WebhookServer:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, method: str, path: str, headers: Any,
               read_body: Callable[[int], bytes]) -> tuple[int, dict, dict]:
        """One request -> (status, JSON body, what to log). The secret is checked before the
        body is read; the body is read (up to max_body_bytes) before anything is queued."""
        config = self.settings.webhooks
        if path != config.path:
            raise _Refused(404, "not found")
        if method != "POST":
            raise _Refused(405, "only POST is accepted")
        given = headers.get(SECRET_HEADER)
        # headers arrive decoded as latin-1, so this gives back the bytes that were sent
        if given is None or not hmac.compare_digest(given.encode("latin-1"), self._secret):
            raise _Refused(401, f"missing or wrong {SECRET_HEADER} header")
        if "chunked" in headers.get("Transfer-Encoding", "").lower() \
                or headers.get("Content-Length") is None:
            raise _Refused(411, "send the payload with a Content-Length")
        declared = headers["Content-Length"].strip()
        if not (declared.isascii() and declared.isdigit()):
            raise _Refused(400, "the Content-Length is not a number of bytes")
        length = int(declared)
        if length > config.max_body_bytes:
            raise _Refused(413, f"the body is over {config.max_body_bytes} bytes")
        body = read_body(length)
        found = parse_payload(body)
        if isinstance(found, str):
            return 200, {"ignored": found}, {"outcome": "ignored", "reason": found}
        try:
            queued = self.ledger.enqueue(found.repo, found.revision, kind="model", base=None)
        except LedgerError as e:
            raise _Refused(503, "the ledger is unavailable; replay the webhook later",
                           detail=str(e)) from None
        out = {"queued": queued, "repo": found.repo, "revision": found.revision}
        return 202, out, {**out, "outcome": "queued" if queued else "known",
                          "event": f"{found.scope}/{found.action}"}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in flight (bounded by
    block_on_close = True  # REQUEST_TIMEOUT_S and LINGER_S)
    owner: WebhookServer


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = REQUEST_TIMEOUT_S
    error_content_type = "application/json"
    error_message_format = '{"error": "%(explain)s"}'  # a fixed text, never the request's

    def version_string(self) -> str:
        return "safeguard-bot-webhooks"

    def do_POST(self) -> None:
        self._handle()

    do_GET = do_HEAD = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_POST

    def _handle(self) -> None:
        started = time.perf_counter()
        owner = self.server.owner
        path = urlsplit(self.path).path  # never the query: a secret may sit there
        self._body_read = False
        logged: dict = {}
        try:
            status, body, logged = owner._answer(self.command, path, self.headers, self._read)
        except _Refused as e:
            status, body = e.status, {"error": str(e)}
            logged = {"error": str(e), **({"detail": e.detail} if e.detail else {})}
        except Exception as e:  # a bug: still one answer and one log line
            status, body = 500, {"error": "internal error"}
            logged = {"error": "internal error", "detail": f"{type(e).__name__}: {e}"}
        # logged before the answer goes out: whoever got the answer can read the line
        owner.log(json.dumps({
            "status": status, "method": _cut(self.command), "path": _cut(path),
            "repo": logged.pop("repo", None), "revision": logged.pop("revision", None),
            **logged, "client": self.client_address[0],
            "ms": round((time.perf_counter() - started) * 1000, 1)}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", "POST")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if not self._body_read and (self.headers.get("Content-Length", "0").strip() != "0"
                                    or "Transfer-Encoding" in self.headers):
            self._linger()  # the body was not read: let the client finish sending it

    def _read(self, length: int) -> bytes:
        self._body_read = True
        try:
            body = self.rfile.read(length)
        except OSError:  # TimeoutError: the client stalled
            body = b""
        if len(body) != length:
            self.close_connection = True
            raise _Refused(400, f"the body ended after {len(body)} of {length} bytes")
        return body

    def _linger(self) -> None:
        """Read away what the client still sends (for LINGER_S at most), so that it reads
        the answer instead of a connection reset."""
        self.close_connection = True
        conn = self.connection
        try:
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                if not conn.recv(65536):
                    break
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, unknown method, timeout) get a log
        line too, without the request line (it may hold a query string)."""
        self.server.owner.log(json.dumps({
            "status": code, "error": self.responses.get(code, ("",))[0],
            "client": self.client_address[0]}))
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own access log is off: one JSON line per request goes to `log`."""
