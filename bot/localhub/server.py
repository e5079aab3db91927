"""The HTTP side of the local hub: routes, auth, and the JSON shapes huggingface_hub parses.

Only the standard library (http.server). Each request is answered under the store's lock,
except the streaming of file contents and of LFS uploads. Errors carry the headers the client
classifies them by (X-Error-Code: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo;
X-Error-Message) and a JSON body {"error": message}.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import socket
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from bot.localhub import cards
from bot.localhub.store import (
    PR_REF,
    SHA256,
    ApiError,
    Store,
    api_time,
    check_path,
    lfs_pointer,
    not_found,
    now,
)

log = logging.getLogger("bot.localhub")

KINDS = {"models": "model", "datasets": "dataset"}
UNSUPPORTED_KINDS = {"spaces", "kernels", "buckets"}
MAX_BODY = 2 * 1024**3
CHUNK = 1024 * 1024
DISCUSSION_PAGE = 50
MODEL_FIELDS = {"_id", "id", "modelId", "author", "sha", "lastModified", "createdAt", "private",
                "gated", "disabled", "downloads", "downloadsAllTime", "likes", "trendingScore",
                "library_name", "tags", "pipeline_tag", "cardData", "config", "siblings",
                "safetensors", "usedStorage", "spaces"}
DATASET_FIELDS = {"_id", "id", "author", "sha", "lastModified", "createdAt", "private", "gated",
                  "disabled", "downloads", "downloadsAllTime", "likes", "trendingScore", "tags",
                  "cardData", "siblings", "usedStorage", "description"}
LIST_DEFAULT = {
    "model": {"_id", "id", "modelId", "likes", "trendingScore", "private", "downloads", "tags",
              "pipeline_tag", "library_name", "createdAt"},
    "dataset": {"_id", "id", "author", "sha", "lastModified", "private", "gated", "disabled",
                "downloads", "likes", "trendingScore", "tags", "createdAt", "description"},
}
LIST_FULL = {"author", "sha", "lastModified", "gated", "disabled", "siblings"}
SORTS = {"lastModified", "createdAt", "downloads", "likes", "trendingScore", "id"}
XET = ("Xet storage is not supported by the local hub: set HF_HUB_DISABLE_XET=1 (before "
       "huggingface_hub is imported) so that uploads go through LFS")


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


def _bool(value: str, name: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no", ""):
        return False
    raise ApiError(400, f"query parameter {name!r} must be true or false, not {value!r}")


def _fields(body: Any, required: dict[str, Any], optional: dict[str, Any] | None = None,
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
        return False if value is None else _bool(value, name)

    def int(self, name: str, default: int) -> int:
        value = self.one(name)
        if value is None:
            return default
        if not value.isdigit():
            raise ApiError(400, f"query parameter {name!r} must be a non-negative integer")
        return int(value)


def _take_rev(segments: list[str]) -> tuple[str, list[str]]:
    """The revision at the head of a path (refs/pr/N may come quoted or in three parts)."""
    if not segments or not segments[0]:
        raise ApiError(400, "missing revision in the URL")
    if segments[0] == "refs" and len(segments) >= 3 and segments[1] in ("pr", "heads", "tags",
                                                                         "convert"):
        return "/".join(segments[:3]), segments[3:]
    return segments[0], segments[1:]


class Api:
    """The routes. One instance per server; `handle` answers one request."""

    def __init__(self, store: Store, page_size: int):
        self.store = store
        self.page_size = page_size
        self.secret = secrets.token_bytes(32)

    # ---- entry point

    def handle(self, method: str, path: str, query: Query, body: bytes, user: str | None,
               base: str, content_type: str, byte_range: str | None = None) -> Reply:
        """Answer one request whose body has been read (everything but LFS uploads)."""
        segs = [unquote(s) for s in path.split("/")[1:]]
        if len(segs) > 1 and segs[-1] == "":
            segs = segs[:-1]
        ctx = _Ctx(method, segs, query, body, user, base, content_type, byte_range)
        if segs[:1] == ["api"]:
            return self._api(ctx, segs[1:])
        rest = segs[1:] if segs[:1] and segs[0] in KINDS else segs
        if len(rest) >= 2 and rest[1].endswith(".git"):
            return self._lfs(ctx)
        return self._resolve(ctx)

    # ---- /api

    def _api(self, ctx: _Ctx, segs: list[str]) -> Reply:
        head = segs[0] if segs else ""
        if segs == ["whoami-v2"] and ctx.method == "GET":
            return self.whoami(ctx)
        if segs == ["validate-yaml"] and ctx.method == "POST":
            return self.validate_yaml(ctx)
        if segs == ["repos", "create"] and ctx.method == "POST":
            return self.create_repo(ctx)
        if segs == ["repos", "delete"] and ctx.method == "DELETE":
            return self.delete_repo(ctx)
        if head in UNSUPPORTED_KINDS:
            raise ApiError(400, f"{head} are not supported by the local hub (models and "
                                "datasets only)")
        if head in KINDS and len(segs) == 1 and ctx.method == "GET":
            return self.list_repos(ctx, KINDS[head])
        if head in KINDS and len(segs) >= 3:
            return self._repo_api(ctx, KINDS[head], f"{segs[1]}/{segs[2]}", segs[3:])
        if head in KINDS and len(segs) == 2:  # a repo id without a namespace: none here
            raise not_found(segs[1])
        raise self._unknown(ctx)

    def _repo_api(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        action = rest[0] if rest else ""
        m = ctx.method
        routes = {
            ("", "GET"): lambda: self.info(ctx, kind, repo_id, None),
            ("revision", "GET"): lambda: self.info(ctx, kind, repo_id, _take_rev(rest[1:])[0]),
            ("tree", "GET"): lambda: self.tree(ctx, kind, repo_id, rest[1:]),
            ("commits", "GET"): lambda: self.commits(ctx, kind, repo_id, rest[1:]),
            ("refs", "GET"): lambda: self.refs(ctx, kind, repo_id),
            ("paths-info", "POST"): lambda: self.paths_info(ctx, kind, repo_id, rest[1:]),
            ("preupload", "POST"): lambda: self.preupload(ctx, kind, repo_id, rest[1:]),
            ("commit", "POST"): lambda: self.commit(ctx, kind, repo_id, rest[1:]),
            ("branch", "POST"): lambda: self.branch(ctx, kind, repo_id, rest[1:]),
            ("branch", "DELETE"): lambda: self.branch(ctx, kind, repo_id, rest[1:]),
            ("tag", "POST"): lambda: self.tag(ctx, kind, repo_id, rest[1:]),
            ("tag", "DELETE"): lambda: self.tag(ctx, kind, repo_id, rest[1:]),
            ("discussions", "GET"): lambda: self.discussions(ctx, kind, repo_id, rest[1:]),
            ("discussions", "POST"): lambda: self.discussions(ctx, kind, repo_id, rest[1:]),
            ("settings", "PUT"): lambda: self.settings(ctx, kind, repo_id),
            ("user-access-request", "POST"): lambda: self.grant(ctx, kind, repo_id, rest[1:]),
            ("like", "POST"): lambda: self.like(ctx, kind, repo_id, True),
            ("like", "DELETE"): lambda: self.like(ctx, kind, repo_id, False),
            ("auth-check", "GET"): lambda: self.auth_check(ctx, kind, repo_id, rest[1:]),
        }
        if action.startswith("xet-"):
            raise ApiError(400, XET)
        route = routes.get((action, m))
        if route is None:
            raise self._unknown(ctx)
        return route()

    @staticmethod
    def _unknown(ctx: _Ctx) -> ApiError:
        return ApiError(404, f"the local hub does not implement {ctx.method} "
                             f"/{'/'.join(ctx.segs)} (see docs/localhub.md)")

    # ---- users

    def whoami(self, ctx: _Ctx) -> Reply:
        ctx.query.allow()
        user = ctx.need_user()
        orgs = self.store.users[user]["orgs"]
        return reply_json({
            "type": "user",
            "id": hashlib.sha1(user.encode(), usedforsecurity=False).hexdigest()[:24],
            "name": user, "fullname": user, "email": None, "emailVerified": False,
            "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "",
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write",
                      "avatarUrl": ""} for o in orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "local hub token", "role": "write"}}})

    def validate_yaml(self, ctx: _Ctx) -> Reply:
        ctx.query.allow()
        body = _fields(ctx.json(), {"content": str}, {"repoType": str})
        try:
            cards.parse_front_matter(body["content"])
        except cards.CardError as e:
            return reply_json({"errors": [{"message": str(e)}], "warnings": []}, 400,
                              {"X-Error-Message": str(e)})
        return reply_json({"errors": [], "warnings": []})

    # ---- repos

    def create_repo(self, ctx: _Ctx) -> Reply:
        user = ctx.need_user()
        body = _fields(ctx.json(), {"name": str},
                       {"organization": str, "type": str, "visibility": str, "private": bool})
        kind = body.get("type") or "model"
        visibility = body.get("visibility")
        if visibility not in (None, "public", "private"):
            raise ApiError(400, f"visibility must be public or private, not {visibility!r}")
        private = visibility == "private" or bool(body.get("private"))
        namespace = body.get("organization") or user
        try:
            repo = self.store.create_repo(kind, namespace, body["name"], user, private)
        except ApiError as e:
            if "repo" in e.body:
                e.body = {"url": ctx.repo_url(e.body["repo"])}
            raise
        return reply_json({"url": ctx.repo_url(repo), "name": repo["id"], "id": repo["_id"]})

    def delete_repo(self, ctx: _Ctx) -> Reply:
        user = ctx.need_user()
        body = _fields(ctx.json(), {"name": str}, {"organization": str, "type": str})
        kind = body.get("type") or "model"
        if kind not in KINDS.values():
            raise ApiError(400, f"repo type {kind!r} is not supported by the local hub")
        repo = self.store.writable_repo(kind, f"{body.get('organization') or user}/"
                                              f"{body['name']}", user)
        self.store.delete_repo(repo)
        return reply_json({})

    def settings(self, ctx: _Ctx, kind: str, repo_id: str) -> Reply:
        ctx.query.allow()
        repo = self.store.writable_repo(kind, repo_id, ctx.user)
        body = _fields(ctx.json(), {}, {"gated": (str, bool), "visibility": str,
                                        "private": bool})
        if "gated" in body and body["gated"] not in ("auto", "manual", False):
            raise ApiError(400, "gated must be 'auto', 'manual' or false")
        if body.get("visibility") not in (None, "public", "private"):
            raise ApiError(400, "visibility must be public or private")
        if "gated" in body:
            repo["gated"] = body["gated"]
        if body.get("visibility") is not None:
            repo["private"] = body["visibility"] == "private"
        if body.get("private") is not None:
            repo["private"] = body["private"]
        self.store.save_repo(repo)
        return reply_json({})

    def grant(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        if rest != ["grant"]:
            raise self._unknown(ctx)
        repo = self.store.writable_repo(kind, repo_id, ctx.user)
        body = _fields(ctx.json(), {"user": str})
        if not repo["gated"]:
            raise ApiError(400, f"{repo['id']} is not gated")
        if body["user"] not in self.store.users:
            raise ApiError(404, f"user {body['user']!r} not found")
        if body["user"] not in repo["grants"]:
            repo["grants"].append(body["user"])
            self.store.save_repo(repo)
        return reply_json({})

    def like(self, ctx: _Ctx, kind: str, repo_id: str, on: bool) -> Reply:
        user = ctx.need_user()
        repo = self.store.get_repo(kind, repo_id, user)
        likers = repo["likers"]
        if on and user not in likers:
            likers.append(user)
        elif not on and user in likers:
            likers.remove(user)
        self.store.save_repo(repo)
        return reply_json({})

    def auth_check(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        if rest == ["write"]:
            self.store.writable_repo(kind, repo_id, ctx.user)
        elif rest:
            raise self._unknown(ctx)
        else:
            repo = self.store.get_repo(kind, repo_id, ctx.user)
            ctx.check_gate(self.store, repo)
        return reply_json({})

    # ---- repo info and listings

    def _full(self, ctx: _Ctx, repo: dict, sha: str, names: set[str], blobs: bool) -> dict:
        """The fields of a model or dataset at a commit, as model_info/list_models give them."""
        store = self.store
        commit = store.commit(repo, sha)
        tree = commit["tree"]
        derived = store.derived(repo, sha)
        out: dict[str, Any] = {}
        values = {
            "_id": lambda: repo["_id"], "id": lambda: repo["id"], "modelId": lambda: repo["id"],
            "author": lambda: repo["id"].split("/")[0], "sha": lambda: sha,
            "lastModified": lambda: api_time(commit["date"]),
            "createdAt": lambda: api_time(repo["createdAt"]), "private": lambda: repo["private"],
            "gated": lambda: repo["gated"], "disabled": lambda: False,
            "downloads": lambda: repo["downloads"], "downloadsAllTime": lambda: repo["downloads"],
            "likes": lambda: len(repo["likers"]), "trendingScore": lambda: 0,
            "library_name": lambda: derived.get("library_name"), "tags": lambda: derived["tags"],
            "pipeline_tag": lambda: derived.get("pipeline_tag"),
            "cardData": lambda: derived["cardData"], "config": lambda: derived.get("config"),
            "siblings": lambda: [self._sibling(p, e, blobs) for p, e in sorted(tree.items())],
            "safetensors": lambda: derived.get("safetensors"),
            "usedStorage": lambda: sum(e["size"] for e in tree.values()),
            "spaces": lambda: [], "description": lambda: "",
        }
        for name in names:
            value = values[name]()
            if value is not None or name in ("gated", "library_name", "pipeline_tag"):
                out[name] = value
        return out

    @staticmethod
    def _sibling(path: str, entry: dict, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": path}
        out: dict[str, Any] = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if entry["lfs"]:
            out["lfs"] = {"size": entry["size"], "sha256": entry["sha256"],
                          "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
        return out

    @staticmethod
    def _expand(kind: str, values: list[str]) -> set[str]:
        allowed = MODEL_FIELDS if kind == "model" else DATASET_FIELDS
        unknown = set(values) - allowed
        if unknown:
            raise ApiError(400, f"unsupported expand value(s): {', '.join(sorted(unknown))}; "
                                f"the local hub knows {', '.join(sorted(allowed))}")
        return {"_id", "id", *values}

    def info(self, ctx: _Ctx, kind: str, repo_id: str, rev: str | None) -> Reply:
        q = ctx.query.allow("blobs", "expand", "securityStatus")
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        sha = self.store.resolve(repo, rev or "main")
        expand = q.all("expand")
        names = self._expand(kind, expand) if expand else (
            MODEL_FIELDS if kind == "model" else DATASET_FIELDS)
        out = self._full(ctx, repo, sha, names, q.flag("blobs"))
        if q.flag("securityStatus"):
            out["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
        return reply_json(out)

    def list_repos(self, ctx: _Ctx, kind: str) -> Reply:
        q = ctx.query.allow("search", "author", "filter", "sort", "direction", "limit", "full",
                            "cardData", "config", "expand", "gated", "pipeline_tag", "cursor")
        if kind == "dataset" and q.raw.get("config"):
            raise ApiError(400, "config is for models")
        repos = self.store.list_repos(kind, ctx.user)
        heads = {r["id"]: r["branches"]["main"] for r in repos}
        searches = [s.lower() for s in q.all("search")]
        author = (q.one("author") or "").lower()
        filters = q.all("filter")
        gated = q.one("gated")
        pipeline = q.one("pipeline_tag")
        chosen = []
        for r in repos:
            derived = self.store.derived(r, heads[r["id"]])
            if any(s not in r["id"].lower() for s in searches):
                continue
            if author and r["id"].split("/")[0].lower() != author:
                continue
            if any(f not in derived["tags"] for f in filters):
                continue
            if gated is not None and bool(r["gated"]) != _bool(gated, "gated"):
                continue
            if pipeline and derived.get("pipeline_tag") != pipeline:
                continue
            chosen.append(r)
        sort = q.one("sort")
        if sort is not None and sort not in SORTS:
            raise ApiError(400, f"cannot sort by {sort!r}: use one of {', '.join(sorted(SORTS))}")
        direction = q.one("direction", "-1")
        if direction not in ("-1", "1"):
            raise ApiError(400, "direction must be -1 or 1")
        chosen.sort(key=lambda r: (r["createdAt"], r["id"]), reverse=True)
        if sort is not None:
            def key(r: dict) -> Any:
                return {"lastModified": lambda: self.store.commit(r, heads[r["id"]])["date"],
                        "createdAt": lambda: r["createdAt"], "downloads": lambda: r["downloads"],
                        "likes": lambda: len(r["likers"]), "trendingScore": lambda: 0,
                        "id": lambda: r["id"].lower()}[sort]()
            chosen.sort(key=key, reverse=direction == "-1")
        expand = q.all("expand")
        if expand and (q.raw.get("full") or q.raw.get("cardData") or q.raw.get("config")):
            raise ApiError(400, "expand cannot be combined with full, cardData or config")
        if expand:
            names = self._expand(kind, expand)
        else:
            names = set(LIST_DEFAULT[kind])
            if q.flag("full"):
                names |= LIST_FULL | ({"cardData"} if kind == "dataset" else set())
            if q.flag("cardData"):
                names.add("cardData")
            if q.flag("config"):
                names.add("config")
        page, link = self._page(ctx, chosen, q.int("limit", self.page_size))
        return reply_json([self._full(ctx, r, heads[r["id"]], names, False) for r in page],
                          headers=link)

    def _page(self, ctx: _Ctx, items: list, limit: int) -> tuple[list, dict]:
        """One page from the cursor, and the Link header to the next one, as the Hub pages."""
        size = max(1, min(limit or self.page_size, self.page_size))
        start = ctx.query.int("cursor", 0)
        page = items[start:start + size]
        if start + size >= len(items):
            return page, {}
        params = [(k, v) for k, vs in ctx.query.raw.items() if k != "cursor" for v in vs]
        params.append(("cursor", str(start + size)))
        url = f"{ctx.base}/{'/'.join(quote(s, safe='') for s in ctx.segs)}?{urlencode(params)}"
        return page, {"Link": f'<{url}>; rel="next"'}

    # ---- trees and commits

    def _entry_json(self, repo: dict, path: str, entry: dict) -> dict:
        out: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"],
                               "path": path}
        if entry["lfs"]:
            out["lfs"] = {"oid": entry["sha256"], "size": entry["size"],
                          "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
        return out

    @staticmethod
    def _dir_json(tree: dict, path: str) -> dict:
        below = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/"))
        oid = hashlib.sha1(json.dumps(below).encode(), usedforsecurity=False).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def _entries(self, repo: dict, tree: dict, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path}/" if path else ""
        out: dict[str, dict] = {}
        for p in sorted(tree):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    d = prefix + "/".join(parts[:i])
                    if d not in out:
                        out[d] = self._dir_json(tree, d)
            if recursive or len(parts) == 1:
                out[p] = self._entry_json(repo, p, tree[p])
        return [out[k] for k in sorted(out)]

    def _with_last_commits(self, repo: dict, sha: str, entries: list[dict]) -> None:
        history = self.store.ancestors(repo, sha)
        for entry in entries:
            path = entry["path"]

            def state(commit: dict, path: str = path) -> Any:
                tree = commit["tree"]
                if path in tree:
                    return tree[path]["oid"]
                return sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/"))

            last = history[0]
            for older in history[1:]:
                if state(older) != state(last):
                    break
                last = older
            entry["lastCommit"] = {"id": last["id"], "title": last["title"],
                                   "date": api_time(last["date"])}
            if entry["type"] == "file":
                entry["securityFileStatus"] = {
                    "status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": {"highestSafetyLevel": "innocuous", "imports": []}}

    def tree(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        q = ctx.query.allow("recursive", "expand", "cursor", "limit")
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        rev, path_parts = _take_rev(rest)
        sha = self.store.resolve(repo, rev)
        path = "/".join(path_parts).strip("/")
        tree = self.store.commit(repo, sha)["tree"]
        entries = self._entries(repo, tree, path, q.flag("recursive"))
        if path and not entries:
            raise ApiError(404, f"{path!r} is not a folder at {rev}", "EntryNotFound")
        page, link = self._page(ctx, entries, q.int("limit", self.page_size))
        if q.flag("expand"):
            self._with_last_commits(repo, sha, page)
        return reply_json(page, headers=link)

    def paths_info(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        ctx.query.allow()
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        sha = self.store.resolve(repo, _take_rev(rest)[0])
        if ctx.content_type.startswith("application/json"):
            form = _fields(ctx.json(), {"paths": list}, {"expand": bool})
            paths, expand = form["paths"], bool(form.get("expand"))
        else:
            raw = parse_qs(ctx.body.decode("utf-8", "replace"), keep_blank_values=True)
            unknown = set(raw) - {"paths", "expand"}
            if unknown:
                raise ApiError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
            paths = raw.get("paths", [])
            expand = _bool((raw.get("expand") or ["false"])[0], "expand")
        tree = self.store.commit(repo, sha)["tree"]
        out = []
        for p in paths:
            if not isinstance(p, str):
                raise ApiError(400, "paths must be strings")
            p = p.strip("/")
            if p in tree:
                out.append(self._entry_json(repo, p, tree[p]))
            elif any(k.startswith(p + "/") for k in tree):
                out.append(self._dir_json(tree, p))
        if expand:
            self._with_last_commits(repo, sha, out)
        return reply_json(out)

    def commits(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        q = ctx.query.allow("expand[]", "expand", "cursor", "limit")
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        rev, _ = _take_rev(rest)
        history = self.store.ancestors(repo, self.store.resolve(repo, rev))
        formatted = "formatted" in q.all("expand[]") + q.all("expand")
        items = []
        for c in history:
            item = {"id": c["id"], "title": c["title"], "message": c["message"],
                    "date": api_time(c["date"]), "parents": c["parents"],
                    "authors": [{"user": c["author"], "avatar": ""}]}
            if formatted:
                item["formatted"] = {"title": html.escape(c["title"]),
                                     "message": html.escape(c["message"])}
            items.append(item)
        page, link = self._page(ctx, items, q.int("limit", self.page_size))
        return reply_json(page, headers=link)

    def refs(self, ctx: _Ctx, kind: str, repo_id: str) -> Reply:
        q = ctx.query.allow("include_prs")
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        branches = sorted(repo["branches"].items(), key=lambda kv: (kv[0] != "main", kv[0]))
        out: dict[str, Any] = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                         for n, s in branches],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": t["commit"]}
                     for n, t in sorted(repo["tags"].items())]}
        if q.flag("include_prs"):
            out["pullRequests"] = [
                {"name": f"refs/pr/{d['num']}", "ref": f"refs/pr/{d['num']}",
                 "targetCommit": d["head"]}
                for d in repo["discussions"] if d["isPullRequest"]]
        return reply_json(out)

    # ---- uploads and commits

    def _commit_target(self, ctx: _Ctx, repo: dict, rev: str, create_pr: bool
                       ) -> tuple[str | None, int | None]:
        """(branch, PR number) a commit or preupload aims at, with the permission checks."""
        user = ctx.need_user()
        pr = PR_REF.match(rev)
        if pr:
            if create_pr:
                raise ApiError(400, "create_pr needs a branch as revision, not a PR ref")
            d = self.store.discussion(repo, int(pr.group(1)), "RevisionNotFound")
            if not self.store.may_moderate(user, repo, d):
                raise ApiError(403, "Only the pull request's author or the repo's owners can "
                                    "push to it")
            return None, int(pr.group(1))
        branch = rev.removeprefix("refs/heads/")
        if branch not in repo["branches"]:
            self.store.resolve(repo, rev)  # 404 RevisionNotFound when it is nothing at all
            raise ApiError(400, f"Invalid rev id: {rev} is not a branch; commits go to a branch "
                                "or a pull request ref (refs/pr/N)")
        if not create_pr and not self.store.can_write(user, repo):
            raise ApiError(403, f"You don't have write access to {repo['id']}; open a pull "
                                "request instead (create_pr=True)")
        return branch, None

    def preupload(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        q = ctx.query.allow("create_pr")
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        rev, _ = _take_rev(rest)
        self._commit_target(ctx, repo, rev, q.flag("create_pr"))
        body = _fields(ctx.json(), {"files": list}, {"gitIgnore": str})
        sha = self.store.resolve(repo, rev)
        tree = self.store.commit(repo, sha)["tree"]
        attributes = tree.get(".gitattributes")
        patterns = cards.lfs_patterns(
            self.store.read_blob(attributes["sha256"]).decode("utf-8", "replace")
            if attributes else cards.DEFAULT_GITATTRIBUTES)
        files = []
        for i, f in enumerate(body["files"]):
            f = _fields(f, {"path": str, "sample": str, "size": int}, what=f"files[{i}]")
            path = check_path(f["path"])
            try:
                sample = base64.b64decode(f["sample"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise ApiError(400, f"files[{i}].sample is not base64") from e
            mode = cards.upload_mode(path, f["size"], sample, patterns)
            item: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            existing = tree.get(path)
            if existing is not None:
                item["oid"] = existing["sha256"] if existing["lfs"] else existing["oid"]
            files.append(item)
        return reply_json({"files": files, "commitOid": sha})

    def commit(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        q = ctx.query.allow("create_pr", "hot_reload")
        if q.flag("hot_reload"):
            raise ApiError(400, "hot_reload is for Spaces, which the local hub does not have")
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        rev, _ = _take_rev(rest)
        create_pr = q.flag("create_pr")
        branch, pr_num = self._commit_target(ctx, repo, rev, create_pr)
        header, operations = self._parse_ndjson(ctx)
        result = self.store.apply_commit(repo, branch=branch, pr_num=pr_num, create_pr=create_pr,
                                         operations=operations, header=header, user=ctx.user)
        out = {"success": True, "commitOid": result["sha"], "hookOutput": "",
               "commitUrl": f"{ctx.repo_url(repo)}/commit/{result['sha']}"}
        if result["pr"] is not None:
            out["pullRequestUrl"] = f"{ctx.repo_url(repo)}/discussions/{result['pr']['num']}"
        return reply_json(out)

    @staticmethod
    def _parse_ndjson(ctx: _Ctx) -> tuple[dict, list[tuple[str, dict]]]:
        if not ctx.content_type.startswith("application/x-ndjson"):
            raise ApiError(400, "a commit payload must be application/x-ndjson")
        lines = [line for line in ctx.body.split(b"\n") if line.strip()]
        if not lines:
            raise ApiError(400, "empty commit payload")
        header: dict | None = None
        operations: list[tuple[str, dict]] = []
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ApiError(400, f"commit payload line {n} is not JSON") from e
            item = _fields(item, {"key": str, "value": dict}, what=f"commit payload line {n}")
            key, value = item["key"], item["value"]
            where = f"commit payload line {n} ({key})"
            if n == 1 and key != "header":
                raise ApiError(400, "the first line of a commit payload must be the header")
            if key == "header":
                if n != 1:
                    raise ApiError(400, f"{where}: only the first line can be a header")
                header = _fields(value, {"summary": str}, {"description": str,
                                                           "parentCommit": str}, where)
                if not header["summary"].strip():
                    raise ApiError(400, "the commit summary (message) cannot be empty")
                if header.get("parentCommit") is not None and not re.fullmatch(
                        r"[0-9a-fA-F]{5,40}", header["parentCommit"]):
                    raise ApiError(400, f"{where}: parentCommit is not a commit id")
                if header.get("parentCommit") is not None:
                    header["parentCommit"] = header["parentCommit"].lower()
            elif key == "file":
                value = _fields(value, {"path": str, "content": str}, {"encoding": str}, where)
                encoding = value.get("encoding") or "base64"
                if encoding == "base64":
                    try:
                        data = base64.b64decode(value["content"], validate=True)
                    except (binascii.Error, ValueError) as e:
                        raise ApiError(400, f"{where}: content is not base64") from e
                elif encoding in ("utf-8", "utf8"):
                    data = value["content"].encode()
                else:
                    raise ApiError(400, f"{where}: unknown encoding {encoding!r}")
                operations.append(("file", {"path": check_path(value["path"]), "data": data}))
            elif key == "lfsFile":
                value = _fields(value, {"path": str, "oid": str}, {"algo": str, "size": int},
                                where)
                if value.get("algo", "sha256") != "sha256" or not SHA256.match(value["oid"]):
                    raise ApiError(400, f"{where}: oid must be a sha256 (64 lowercase hex)")
                operations.append(("lfsFile", {**value, "path": check_path(value["path"])}))
            elif key in ("deletedFile", "deletedFolder"):
                value = _fields(value, {"path": str}, what=where)
                path = value["path"].rstrip("/") if key == "deletedFolder" else value["path"]
                operations.append((key, {"path": check_path(path)}))
            else:
                raise ApiError(400, f"unknown key {key!r} in commit payload line {n}: expected "
                                    "header, file, lfsFile, deletedFile or deletedFolder")
        assert header is not None
        return header, operations

    # ---- branches and tags

    def branch(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        ctx.query.allow()
        repo = self.store.writable_repo(kind, repo_id, ctx.user)
        name = "/".join(rest)
        if not name:
            raise ApiError(400, "missing branch name")
        if ctx.method == "DELETE":
            self.store.delete_branch(repo, name)
        else:
            body = _fields(ctx.json(allow_empty=True), {}, {"startingPoint": str})
            self.store.create_branch(repo, name, body.get("startingPoint"), ctx.user)
        return reply_json({})

    def tag(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        ctx.query.allow()
        repo = self.store.writable_repo(kind, repo_id, ctx.user)
        name = "/".join(rest)
        if not name:
            raise ApiError(400, "missing revision or tag in the URL")
        if ctx.method == "DELETE":
            self.store.delete_tag(repo, name)
        else:
            body = _fields(ctx.json(), {"tag": str}, {"message": str})
            self.store.create_tag(repo, body["tag"], name, body.get("message") or "")
        return reply_json({})

    # ---- discussions

    def _discussion_json(self, ctx: _Ctx, repo: dict, d: dict, details: bool) -> dict:
        out: dict[str, Any] = {
            "num": d["num"], "title": d["title"], "status": d["status"],
            "author": {"name": d["author"], "type": "user"}, "createdAt": d["createdAt"],
            "repo": {"name": repo["id"], "type": repo["type"]},
            "isPullRequest": d["isPullRequest"], "pinned": False, "topReactions": [],
            "numComments": sum(e["type"] == "comment" for e in d["events"])}
        if details:
            out["events"] = d["events"]
            if d["isPullRequest"]:
                out["changes"] = {"base": f"refs/heads/{d['base']}"}
                if d.get("mergeCommitId"):
                    out["changes"]["mergeCommitId"] = d["mergeCommitId"]
                out["filesWithConflicts"] = []
                out["diff"] = self._diff(repo, d)
        return out

    def _diff(self, repo: dict, d: dict) -> str:
        """A list of the files a PR changes, as diff headers (no content lines)."""
        before = self.store.commit(repo, d["baseCommit"])["tree"]
        after = self.store.commit(repo, d["head"])["tree"]
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        return "".join(f"diff --git a/{p} b/{p}\n" for p in changed)

    def discussions(self, ctx: _Ctx, kind: str, repo_id: str, rest: list[str]) -> Reply:
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        if not rest:
            if ctx.method == "POST":
                return self._new_discussion(ctx, repo)
            return self._list_discussions(ctx, repo)
        if not rest[0].isdigit():
            raise self._unknown(ctx)
        d = self.store.discussion(repo, int(rest[0]))
        action = rest[1:]
        if not action and ctx.method == "GET":
            ctx.query.allow("diff")
            return reply_json(self._discussion_json(ctx, repo, d, details=True))
        if ctx.method != "POST":
            raise self._unknown(ctx)
        ctx.query.allow()
        user = ctx.need_user()
        store = self.store
        if action == ["comment"]:
            body = _fields(ctx.json(), {"comment": str})
            if not body["comment"].strip():
                raise ApiError(400, "a comment cannot be empty")
            event = store.event("comment", user, raw=body["comment"])
            d["events"].append(event)
            store.save_repo(repo)
            return reply_json({"newMessage": event})
        if len(action) == 3 and action[0] == "comment" and action[2] == "edit":
            body = _fields(ctx.json(), {"content": str})
            event = next((e for e in d["events"] if e["id"] == action[1]
                          and e["type"] == "comment"), None)
            if event is None:
                raise ApiError(404, f"comment {action[1]} not found")
            if event["author"]["name"] != user:
                raise ApiError(403, "only a comment's author can edit it")
            latest = event["data"]["latest"]
            event["data"]["history"].insert(0, dict(latest))
            latest.update(raw=body["content"], html=body["content"], updatedAt=api_time(now()))
            event["data"]["edited"] = True
            store.save_repo(repo)
            return reply_json({"updatedComment": event})
        if not store.may_moderate(user, repo, d) and action != ["merge"]:
            raise ApiError(403, "only the discussion's author or the repo's owners can do that")
        if action == ["title"]:
            body = _fields(ctx.json(), {"title": str})
            title = body["title"].strip()
            if not 3 <= len(title) <= 200:
                raise ApiError(400, "A title must have 3 to 200 characters")
            event = store.event("title-change", user, old=d["title"], new=title)
            d["title"] = title
            d["events"].append(event)
            store.save_repo(repo)
            return reply_json({"newTitle": event})
        if action == ["status"]:
            body = _fields(ctx.json(), {"status": str}, {"comment": str})
            if body["status"] not in ("open", "closed"):
                raise ApiError(400, "status must be open or closed")
            if d["status"] == "merged":
                raise ApiError(400, f"#{d['num']} is merged; its status cannot change")
            if body.get("comment"):
                d["events"].append(store.event("comment", user, raw=body["comment"]))
            event = store.event("status-change", user, status=body["status"])
            d["status"] = body["status"]
            d["events"].append(event)
            store.save_repo(repo)
            return reply_json({"newStatus": event})
        if action == ["merge"]:
            if not store.can_write(user, repo):
                raise ApiError(403, f"only the owners of {repo['id']} can merge pull requests")
            body = _fields(ctx.json(allow_empty=True), {}, {"comment": str})
            store.merge(repo, d, user, body.get("comment"))
            return reply_json({})
        raise self._unknown(ctx)

    def _new_discussion(self, ctx: _Ctx, repo: dict) -> Reply:
        ctx.query.allow()
        user = ctx.need_user()
        body = _fields(ctx.json(), {"title": str}, {"description": str, "pullRequest": bool})
        d = self.store.create_discussion(repo, body["title"], body.get("description") or "",
                                         user, bool(body.get("pullRequest")))
        return reply_json({"num": d["num"], "pullRequest": d["isPullRequest"],
                           "url": f"{ctx.repo_url(repo)}/discussions/{d['num']}"})

    def _list_discussions(self, ctx: _Ctx, repo: dict) -> Reply:
        q = ctx.query.allow("p", "type", "status", "author", "search")
        kind = q.one("type", "all")
        status = q.one("status", "all")
        if kind not in ("all", "discussion", "pull_request"):
            raise ApiError(400, "type must be all, discussion or pull_request")
        if status not in ("all", "open", "closed"):
            raise ApiError(400, "status must be all, open or closed")
        author, search = q.one("author"), (q.one("search") or "").lower()
        chosen = []
        for d in reversed(repo["discussions"]):
            if kind != "all" and d["isPullRequest"] != (kind == "pull_request"):
                continue
            if status == "open" and d["status"] not in ("open", "draft"):
                continue
            if status == "closed" and d["status"] not in ("closed", "merged"):
                continue
            if author is not None and d["author"] != author:
                continue
            if search and search not in d["title"].lower():
                continue
            chosen.append(d)
        size = min(DISCUSSION_PAGE, self.page_size)
        start = q.int("p", 0) * size
        return reply_json({
            "discussions": [self._discussion_json(ctx, repo, d, False)
                            for d in chosen[start:start + size]],
            "count": len(chosen), "start": start,
            "numClosedDiscussions": sum(d["status"] in ("closed", "merged") for d in chosen)})

    # ---- file downloads

    def _resolve(self, ctx: _Ctx) -> Reply:
        segs = ctx.segs
        kind = "model"
        if segs and segs[0] in UNSUPPORTED_KINDS:
            raise ApiError(400, f"{segs[0]} are not supported by the local hub")
        if segs and segs[0] in KINDS:
            kind, segs = KINDS[segs[0]], segs[1:]
        if len(segs) >= 3 and segs[1] == "resolve":  # a repo id without a namespace: none here
            raise not_found(segs[0])
        if len(segs) < 5 or segs[2] != "resolve" or ctx.method not in ("GET", "HEAD"):
            raise self._unknown(ctx)
        ctx.query.allow("download")
        repo = self.store.get_repo(kind, f"{segs[0]}/{segs[1]}", ctx.user)
        ctx.check_gate(self.store, repo)
        rev, path_parts = _take_rev(segs[3:])
        sha = self.store.resolve(repo, rev)
        path = "/".join(path_parts)
        entry = self.store.commit(repo, sha)["tree"].get(path)
        if entry is None:
            raise _EntryMissing(path, rev, sha)
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}"}
        if entry["lfs"]:
            headers |= {"ETag": f'"{entry["sha256"]}"', "X-Linked-Etag": f'"{entry["sha256"]}"',
                        "X-Linked-Size": str(entry["size"])}
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        size = entry["size"]
        offset, length, status = 0, size, 200
        byte_range = ctx.range
        if byte_range:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range.strip())
            if m is None or (not m.group(1) and not m.group(2)):
                raise ApiError(416, f"unsupported Range {byte_range!r}")
            if m.group(1):
                offset = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
            else:
                offset, end = max(0, size - int(m.group(2))), size - 1
            end = min(end, size - 1)
            if offset >= size or end < offset:
                return Reply(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
            length, status = end - offset + 1, 206
            headers["Content-Range"] = f"bytes {offset}-{end}/{size}"
        if ctx.method == "GET" and offset == 0:
            repo["downloads"] += 1
            self.store.save_repo(repo)
        return Reply(status, b"", headers, self.store.blob_path(entry["sha256"]), offset, length)

    # ---- LFS

    def _lfs(self, ctx: _Ctx) -> Reply:
        segs = ctx.segs
        kind = "model"
        if segs[0] in KINDS:
            kind, segs = KINDS[segs[0]], segs[1:]
        if len(segs) != 6 or segs[2:5] != ["info", "lfs", "objects"] or ctx.method != "POST":
            raise self._unknown(ctx)
        ctx.query.allow()
        repo_id = f"{segs[0]}/{segs[1].removesuffix('.git')}"
        repo = self.store.get_repo(kind, repo_id, ctx.user)
        ctx.need_user()
        if segs[5] == "verify":
            body = _fields(ctx.json(), {"oid": str, "size": int})
            if not SHA256.match(body["oid"]) or not self.store.has_blob(body["oid"],
                                                                          body["size"]):
                raise ApiError(404, f"LFS object {body['oid']} ({body['size']} bytes) not found")
            return reply_json({}, content_type="application/vnd.git-lfs+json")
        if segs[5] != "batch":
            raise self._unknown(ctx)
        body = _fields(ctx.json(), {"operation": str, "objects": list},
                       {"transfers": list, "hash_algo": str, "ref": dict})
        if body["operation"] != "upload":
            raise ApiError(400, "the local hub's LFS batch endpoint only uploads; download "
                                "files through /resolve")
        if body.get("hash_algo", "sha256") != "sha256":
            raise ApiError(400, "hash_algo must be sha256")
        if "basic" not in (body.get("transfers") or ["basic"]):
            raise ApiError(400, "only the basic LFS transfer is supported")
        objects = []
        for i, obj in enumerate(body["objects"]):
            obj = _fields(obj, {"oid": str, "size": int}, what=f"objects[{i}]")
            oid, size = obj["oid"], obj["size"]
            if not SHA256.match(oid) or size < 0:
                raise ApiError(400, f"objects[{i}]: oid must be a sha256 and size >= 0")
            if self.store.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})
                continue
            sig = self._sign(oid, size)
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{ctx.base}/lfs-upload/{oid}?size={size}&sig={sig}",
                           "expires_in": 86400},
                "verify": {"href": f"{ctx.base}/{ctx.prefix(kind)}{repo['id']}.git/info/lfs/"
                                   "objects/verify"}}})
        return reply_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                          content_type="application/vnd.git-lfs+json")

    def _sign(self, oid: str, size: int) -> str:
        return hmac.new(self.secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def check_upload(self, path: str, query: Query) -> tuple[str, int]:
        """The oid and size an LFS upload URL was signed for (403 when the signature is wrong)."""
        segs = path.split("/")
        q = query.allow("size", "sig")
        oid = segs[2] if len(segs) == 3 else ""
        size = q.int("size", -1)
        sig = q.one("sig") or ""
        if not SHA256.match(oid) or size < 0 or not hmac.compare_digest(sig,
                                                                          self._sign(oid, size)):
            raise ApiError(403, "invalid or expired LFS upload URL")
        return oid, size


class _EntryMissing(ApiError):
    """EntryNotFound, carrying the commit the client caches the absence under."""

    def __init__(self, path: str, rev: str, sha: str):
        super().__init__(404, f"Entry not found: {path} at {rev}", "EntryNotFound")
        self.headers = {"X-Repo-Commit": sha}


@dataclass
class _Ctx:
    """One request as the routes see it."""

    method: str
    segs: list[str]
    query: Query
    body: bytes
    user: str | None
    base: str
    content_type: str
    range: str | None = None

    def need_user(self) -> str:
        if self.user is None:
            raise ApiError(401, "You must be authenticated to do this: pass a token "
                                "(Authorization: Bearer hf_...)")
        return self.user

    def json(self, allow_empty: bool = False) -> Any:
        if not self.body.strip():
            if allow_empty:
                return {}
            raise ApiError(400, "missing JSON body")
        try:
            return json.loads(self.body)
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


class Server(ThreadingHTTPServer):
    """The HTTP server: one thread per connection; remembers connections to close on stop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # parallel downloads open many connections at once

    def __init__(self, address: tuple[str, int], api: Api):
        self.api = api
        self.stopping = False
        self.connections: set[socket.socket] = set()
        super().__init__(address, Handler)

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
        api = self.server.api
        try:
            url = urlsplit(self.path)
            query = Query(url.query)
            if method == "PUT" and url.path.startswith("/lfs-upload/"):
                self._send(self._upload(api, url.path, query), method)
                return
            body = self._read_body()
            host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
            ctx_type = (self.headers.get("Content-Type") or "").lower()
            with api.store.lock:
                user = self._user(api.store)
                reply = api.handle(method, url.path, query, body, user, f"http://{host}",
                                   ctx_type, self.headers.get("Range"))
        except (ConnectionError, TimeoutError):  # the client went away mid-request
            self.close_connection = True
            return
        except ApiError as e:
            reply = reply_json({**e.body, "error": str(e)}, e.status,
                               {"X-Error-Message": str(e), **({"X-Error-Code": e.code}
                                                              if e.code else {}),
                                **getattr(e, "headers", {})})
        except Exception as e:  # a bug: answer it, log it, keep serving
            log.exception("local hub: %s %s failed", method, self.path)
            reply = reply_json({"error": f"local hub internal error: {type(e).__name__}: {e}"},
                               500, {"X-Error-Message": "local hub internal error"})
        self._send(reply, method)

    def _user(self, store: Store) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, token = auth.partition(" ")
        user = store.user_for_token(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, "Invalid credentials in Authorization header")
        return user

    def _read_body(self, sink: Any = None) -> bytes:
        """The request body (Content-Length or chunked); streamed into `sink` when given."""
        parts: list[bytes] = []
        total = 0

        def take(data: bytes) -> None:
            nonlocal total
            total += len(data)
            if total > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "request body too large")
            if sink is not None:
                sink(data)
            else:
                parts.append(data)

        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size_line = self.rfile.readline(1024)
                try:
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    self.close_connection = True
                    raise ApiError(400, "malformed chunked body") from None
                if size == 0:
                    while self.rfile.readline(1024).strip():
                        pass
                    break
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, CHUNK))
                    if not data:
                        raise ApiError(400, "truncated chunked body")
                    take(data)
                    remaining -= len(data)
                self.rfile.readline(16)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            if remaining > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "request body too large")
            while remaining:
                data = self.rfile.read(min(remaining, CHUNK))
                if not data:
                    raise ApiError(400, "truncated body")
                take(data)
                remaining -= len(data)
        return b"".join(parts)

    def _upload(self, api: Api, path: str, query: Query) -> Reply:
        """PUT of an LFS object: streamed to disk, hashed, checked against the signed oid."""
        try:
            oid, size = api.check_upload(path, query)
        except ApiError:
            self.close_connection = True
            raise
        digest = hashlib.sha256()
        f, tmp = api.store.new_upload()
        try:
            with f:
                def sink(data: bytes) -> None:
                    digest.update(data)
                    f.write(data)
                self._read_body(sink)
                written = f.tell()
            if digest.hexdigest() != oid or written != size:
                raise ApiError(400, f"uploaded content does not match oid {oid} and size {size}")
            with api.store.lock:
                api.store.finish_upload(tmp, oid)
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


__all__ = ["Api", "Server"]
