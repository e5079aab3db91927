"""What every route works with: the request as routes see it, its checks, and the reply.

Errors carry the headers the client classifies them by (X-Error-Code: RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo; X-Error-Message) and a JSON body {"error": message}.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from bot.localhub.errors import ApiError
from bot.localhub.store import Store

KINDS = {"models": "model", "datasets": "dataset"}


@dataclass
class Reply:
    """An HTTP answer: JSON or bytes, or a stored file (a byte range of it) to stream."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    offset: int = 0
    length: int = 0


def reply_json(data: Any, status: int = 200, headers: dict | None = None,
               content_type: str = "application/json") -> Reply:
    """A JSON answer."""
    return Reply(status, json.dumps(data).encode(),
                 {"Content-Type": f"{content_type}; charset=utf-8", **(headers or {})})


def error_reply(e: ApiError) -> Reply:
    """The answer to a refused request: JSON {"error": ...} and the X-Error-* headers."""
    code = {"X-Error-Code": e.code} if e.code else {}
    return reply_json({**e.body, "error": str(e)}, e.status,
                      {"X-Error-Message": str(e), **code, **e.headers})


def parse_bool(value: str, name: str) -> bool:
    """A true/false query or form value (400 otherwise)."""
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no", ""):
        return False
    raise ApiError(400, f"query parameter {name!r} must be true or false, not {value!r}")


def require_fields(body: Any, required: dict[str, Any], optional: dict[str, Any] | None = None,
                   what: str = "request body") -> dict:
    """A JSON object with exactly these keys of these types (optional ones may be null)."""
    optional = optional or {}
    if not isinstance(body, dict):
        raise ApiError(400, f"{what} must be a JSON object")
    unknown = set(body) - set(required) - set(optional)
    if unknown:
        raise ApiError(400, f"unknown field(s) in {what}: {', '.join(sorted(unknown))}")
    for name, kind in required.items():
        if name not in body:
            raise ApiError(400, f"missing field {name!r} in {what}")
        if not isinstance(body[name], kind) or (kind is int and isinstance(body[name], bool)):
            raise ApiError(400, f"field {name!r} in {what} has the wrong type")
    for name, kind in optional.items():
        value = body.get(name)
        if value is not None and not isinstance(value, kind):
            raise ApiError(400, f"field {name!r} in {what} has the wrong type")
    return body


class Query:
    """A request's query parameters, checked against what the route accepts."""

    def __init__(self, raw: str):
        self.raw = parse_qs(raw, keep_blank_values=True)

    def allow(self, *names: str) -> Query:
        unknown = set(self.raw) - set(names)
        if unknown:
            raise ApiError(400, "unsupported query parameter(s) for this endpoint: "
                                + ", ".join(sorted(unknown)))
        return self

    def one(self, name: str, default: str | None = None) -> str | None:
        values = self.raw.get(name)
        if not values:
            return default
        if len(values) > 1:
            raise ApiError(400, f"query parameter {name!r} given more than once")
        return values[0]

    def all(self, name: str) -> list[str]:
        return self.raw.get(name, [])

    def flag(self, name: str) -> bool:
        value = self.one(name)
        return False if value is None else parse_bool(value, name)

    def int(self, name: str, default: int) -> int:
        value = self.one(name)
        if value is None:
            return default
        if not value.isdigit():
            raise ApiError(400, f"query parameter {name!r} must be a non-negative integer")
        return int(value)


def take_rev(segments: list[str]) -> tuple[str, list[str]]:
    """The revision at the head of a path (refs/pr/N may come quoted or in three parts)."""
    if not segments or not segments[0]:
        raise ApiError(400, "missing revision in the URL")
    if segments[0] == "refs" and len(segments) >= 3 and segments[1] in ("pr", "heads", "tags",
                                                                         "convert"):
        return "/".join(segments[:3]), segments[3:]
    return segments[0], segments[1:]


@dataclass
class Request:
    """One request as the routes see it; `match` is its route's match of the path."""

    method: str
    segs: list[str]
    query: Query
    body: bytes | None  # None: left unread (an anonymous caller of a route that needs a user)
    user: str | None
    base: str
    content_type: str
    range: str | None = None
    match: re.Match[str] | None = None
    prepared: Any = None  # what the route's prepare step computed before the store's lock

    # ---- what the route's pattern captured

    def arg(self, name: str) -> str:
        """One path segment the route captured (unquoted)."""
        assert self.match is not None
        return unquote(self.match.group(name))

    @property
    def kind(self) -> str:
        """The repo type the path names: model unless it says datasets."""
        assert self.match is not None
        return KINDS[self.match.group("kinds") or "models"]

    @property
    def repo_id(self) -> str:
        return f"{self.arg('ns')}/{self.arg('name')}"

    @property
    def rest(self) -> list[str]:
        """The path segments after the route's fixed part (unquoted)."""
        assert self.match is not None
        rest = self.match.group("rest")
        return [] if rest is None else [unquote(s) for s in rest.split("/")]

    # ---- checks and answers

    def unknown(self) -> ApiError:
        """The 404 for a route the local hub does not have."""
        return ApiError(404, f"the local hub does not implement {self.method} "
                             f"/{'/'.join(self.segs)} (see docs/localhub.md)")

    def need_user(self) -> str:
        if self.user is None:
            raise ApiError(401, "You must be authenticated to do this: pass a token "
                                "(Authorization: Bearer hf_...)")
        return self.user

    def payload(self) -> bytes:
        """The request's body; 401 when it was left unread (the caller has no token)."""
        if self.body is None:
            self.need_user()
        assert self.body is not None
        return self.body

    def json(self, allow_empty: bool = False) -> Any:
        body = self.payload()
        if not body.strip():
            if allow_empty:
                return {}
            raise ApiError(400, "missing JSON body")
        try:
            return json.loads(body)
        except ValueError as e:
            raise ApiError(400, f"malformed JSON body: {e}") from e

    @staticmethod
    def prefix(kind: str) -> str:
        return "" if kind == "model" else f"{kind}s/"

    def repo_url(self, repo: dict) -> str:
        return f"{self.base}/{self.prefix(repo['type'])}{repo['id']}"

    def check_gate(self, store: Store, repo: dict) -> None:
        if store.can_download(self.user, repo):
            return
        if self.user is None:
            raise ApiError(401, f"Access to {repo['type']} {repo['id']} is restricted. You must "
                                "have access to it and be authenticated to access it. Please "
                                "log in.", "GatedRepo")
        raise ApiError(403, f"Access to {repo['type']} {repo['id']} is restricted and you are "
                            f"not in the authorized list. Visit {self.repo_url(repo)} to ask "
                            "for access.", "GatedRepo")
