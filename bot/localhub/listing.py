"""Routes that list: models and datasets (search, filters, sort), a repo's tree and paths,
its commits and its refs; listings longer than a page link to the next one as the Hub does."""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

from bot.localhub.errors import ApiError
from bot.localhub.protocol import (
    Query,
    Reply,
    Request,
    parse_bool,
    reply_json,
    require_fields,
    take_rev,
)
from bot.localhub.records import api_time, lfs_pointer
from bot.localhub.repos import expanded_fields, repo_fields

if TYPE_CHECKING:
    from bot.localhub.api import Api

LIST_DEFAULT = {
    "model": {"_id", "id", "modelId", "likes", "trendingScore", "private", "downloads", "tags",
              "pipeline_tag", "library_name", "createdAt"},
    "dataset": {"_id", "id", "author", "sha", "lastModified", "private", "gated", "disabled",
                "downloads", "likes", "trendingScore", "tags", "createdAt", "description"},
}
LIST_FULL = {"author", "sha", "lastModified", "gated", "disabled", "siblings"}
SORTS = {"lastModified", "createdAt", "downloads", "likes", "trendingScore", "id"}


def page(api: Api, req: Request, items: list, limit: int) -> tuple[list, dict]:
    """One page from the cursor, and the Link header to the next one, as the Hub pages."""
    size = max(1, min(limit or api.page_size, api.page_size))
    start = req.query.int("cursor", 0)
    chunk = items[start:start + size]
    if start + size >= len(items):
        return chunk, {}
    params = [(k, v) for k, vs in req.query.raw.items() if k != "cursor" for v in vs]
    params.append(("cursor", str(start + size)))
    url = f"{req.base}/{'/'.join(quote(s, safe='') for s in req.segs)}?{urlencode(params)}"
    return chunk, {"Link": f'<{url}>; rel="next"'}


# ---- models and datasets

def list_repos(api: Api, req: Request) -> Reply:
    """list_models / list_datasets."""
    kind = req.kind
    q = req.query.allow("search", "author", "filter", "sort", "direction", "limit", "full",
                        "cardData", "config", "expand", "gated", "pipeline_tag", "cursor")
    if kind == "dataset" and q.raw.get("config"):
        raise ApiError(400, "config is for models")
    repos = api.store.list_repos(kind, req.user)
    heads = {r["id"]: r["branches"]["main"] for r in repos}
    wanted = _repo_filter(q)
    chosen = [r for r in repos if wanted(r, api.store.derived(r, heads[r["id"]]))]
    sort = q.one("sort")
    if sort is not None and sort not in SORTS:
        raise ApiError(400, f"cannot sort by {sort!r}: use one of {', '.join(sorted(SORTS))}")
    direction = q.one("direction", "-1")
    if direction not in ("-1", "1"):
        raise ApiError(400, "direction must be -1 or 1")
    chosen.sort(key=lambda r: (r["createdAt"], r["id"]), reverse=True)
    if sort is not None:
        def key(r: dict) -> Any:
            return {"lastModified": lambda: api.store.commit(r, heads[r["id"]])["date"],
                    "createdAt": lambda: r["createdAt"], "downloads": lambda: r["downloads"],
                    "likes": lambda: len(r["likers"]), "trendingScore": lambda: 0,
                    "id": lambda: r["id"].lower()}[sort]()
        chosen.sort(key=key, reverse=direction == "-1")
    names = _listed_fields(q, kind)
    shown, link = page(api, req, chosen, q.int("limit", api.page_size))
    return reply_json([repo_fields(api.store, r, heads[r["id"]], names, False) for r in shown],
                      headers=link)


def warm_listing(api: Api, req: Request) -> None:
    """Before list_models / list_datasets, without the store's lock: the derived data (cards)
    of every head it may show. Errors are left to the route."""
    with api.store.lock:
        heads = [(r, r["branches"]["main"]) for r in api.store.list_repos(req.kind, req.user)]
    for repo, sha in heads:
        with contextlib.suppress(Exception):  # a repo deleted meanwhile: the route answers
            api.store.derived(repo, sha)


def _repo_filter(q: Query) -> Callable[[dict, dict], bool]:
    """Whether a repo (and what its head derives) passes search, author, filter, gated and
    pipeline_tag."""
    searches = [s.lower() for s in q.all("search")]
    author = (q.one("author") or "").lower()
    filters = q.all("filter")
    gated = q.one("gated")
    pipeline = q.one("pipeline_tag")

    def wanted(repo: dict, derived: dict) -> bool:
        return (all(s in repo["id"].lower() for s in searches)
                and (not author or repo["id"].split("/")[0].lower() == author)
                and all(f in derived["tags"] for f in filters)
                and (gated is None or bool(repo["gated"]) == parse_bool(gated, "gated"))
                and (not pipeline or derived.get("pipeline_tag") == pipeline))
    return wanted


def _listed_fields(q: Query, kind: str) -> set[str]:
    """The fields each listed repo shows: the default ones, or what full/cardData/config/expand
    ask for."""
    expand = q.all("expand")
    if expand and (q.raw.get("full") or q.raw.get("cardData") or q.raw.get("config")):
        raise ApiError(400, "expand cannot be combined with full, cardData or config")
    if expand:
        return expanded_fields(kind, expand)
    names = set(LIST_DEFAULT[kind])
    if q.flag("full"):
        names |= LIST_FULL | ({"cardData"} if kind == "dataset" else set())
    if q.flag("cardData"):
        names.add("cardData")
    if q.flag("config"):
        names.add("config")
    return names


# ---- trees

def _file_json(path: str, entry: dict) -> dict:
    out: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"],
                           "path": path}
    if entry["lfs"]:
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"],
                      "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
    return out


def _dir_json(tree: dict, path: str) -> dict:
    below = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/"))
    oid = hashlib.sha1(json.dumps(below).encode(), usedforsecurity=False).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def _entries(tree: dict, path: str, recursive: bool) -> list[dict]:
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
                    out[d] = _dir_json(tree, d)
        if recursive or len(parts) == 1:
            out[p] = _file_json(p, tree[p])
    return [out[k] for k in sorted(out)]


def _with_last_commits(api: Api, repo: dict, sha: str, entries: list[dict]) -> None:
    history = api.store.ancestors(repo, sha)
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


def tree(api: Api, req: Request) -> Reply:
    """list_repo_tree: a folder at a revision (recursive or not), paged."""
    q = req.query.allow("recursive", "expand", "cursor", "limit")
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    rev, path_parts = take_rev(req.rest)
    sha = api.store.resolve(repo, rev)
    path = "/".join(path_parts).strip("/")
    files = api.store.commit(repo, sha)["tree"]
    entries = _entries(files, path, q.flag("recursive"))
    if path and not entries:
        raise ApiError(404, f"{path!r} is not a folder at {rev}", "EntryNotFound")
    shown, link = page(api, req, entries, q.int("limit", api.page_size))
    if q.flag("expand"):
        _with_last_commits(api, repo, sha, shown)
    return reply_json(shown, headers=link)


def paths_info(api: Api, req: Request) -> Reply:
    """get_paths_info: the files and folders among the given paths (JSON or form body)."""
    req.query.allow()
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    sha = api.store.resolve(repo, take_rev(req.rest)[0])
    if req.content_type.startswith("application/json"):
        form = require_fields(req.json(), {"paths": list}, {"expand": bool})
        paths, expand = form["paths"], bool(form.get("expand"))
    else:
        raw = parse_qs(req.payload().decode("utf-8", "replace"), keep_blank_values=True)
        unknown = set(raw) - {"paths", "expand"}
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        paths = raw.get("paths", [])
        expand = parse_bool((raw.get("expand") or ["false"])[0], "expand")
    files = api.store.commit(repo, sha)["tree"]
    out = []
    for p in paths:
        if not isinstance(p, str):
            raise ApiError(400, "paths must be strings")
        p = p.strip("/")
        if p in files:
            out.append(_file_json(p, files[p]))
        elif any(k.startswith(p + "/") for k in files):
            out.append(_dir_json(files, p))
    if expand:
        _with_last_commits(api, repo, sha, out)
    return reply_json(out)


# ---- history and refs

def commits(api: Api, req: Request) -> Reply:
    """list_repo_commits: newest first, paged."""
    q = req.query.allow("expand[]", "expand", "cursor", "limit")
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    rev, _ = take_rev(req.rest)
    history = api.store.ancestors(repo, api.store.resolve(repo, rev))
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
    shown, link = page(api, req, items, q.int("limit", api.page_size))
    return reply_json(shown, headers=link)


def refs(api: Api, req: Request) -> Reply:
    """list_repo_refs: branches (main first), tags and, when asked, pull requests."""
    q = req.query.allow("include_prs")
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
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
