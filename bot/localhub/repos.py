"""Routes for accounts, repos and files: whoami, the YAML check, creating and deleting repos,
their settings, access grants, likes, auth checks, repo info, and file downloads."""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from bot.localhub import cards
from bot.localhub.errors import ApiError, entry_not_found
from bot.localhub.protocol import KINDS, Reply, Request, reply_json, require_fields, take_rev
from bot.localhub.records import api_time, lfs_pointer
from bot.localhub.store import Store

if TYPE_CHECKING:
    from bot.localhub.api import Api

MODEL_FIELDS = {"_id", "id", "modelId", "author", "sha", "lastModified", "createdAt", "private",
                "gated", "disabled", "downloads", "downloadsAllTime", "likes", "trendingScore",
                "library_name", "tags", "pipeline_tag", "cardData", "config", "siblings",
                "safetensors", "usedStorage", "spaces"}
DATASET_FIELDS = {"_id", "id", "author", "sha", "lastModified", "createdAt", "private", "gated",
                  "disabled", "downloads", "downloadsAllTime", "likes", "trendingScore", "tags",
                  "cardData", "siblings", "usedStorage", "description"}

# ---- users


def whoami(api: Api, req: Request) -> Reply:
    req.query.allow()
    user = req.need_user()
    orgs = api.store.users[user]["orgs"]
    return reply_json({
        "type": "user",
        "id": hashlib.sha1(user.encode(), usedforsecurity=False).hexdigest()[:24],
        "name": user, "fullname": user, "email": None, "emailVerified": False,
        "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "",
        "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write",
                  "avatarUrl": ""} for o in orgs],
        "auth": {"type": "access_token",
                 "accessToken": {"displayName": "local hub token", "role": "write"}}})


def validate_yaml(api: Api, req: Request) -> Reply:
    req.query.allow()
    body = require_fields(req.json(), {"content": str}, {"repoType": str})
    try:
        cards.parse_front_matter(body["content"])
    except cards.CardError as e:
        return reply_json({"errors": [{"message": str(e)}], "warnings": []}, 400,
                          {"X-Error-Message": str(e)})
    return reply_json({"errors": [], "warnings": []})


# ---- repos

def create_repo(api: Api, req: Request) -> Reply:
    user = req.need_user()
    body = require_fields(req.json(), {"name": str},
                          {"organization": str, "type": str, "visibility": str, "private": bool})
    kind = body.get("type") or "model"
    visibility = body.get("visibility")
    if visibility not in (None, "public", "private"):
        raise ApiError(400, f"visibility must be public or private, not {visibility!r}")
    private = visibility == "private" or bool(body.get("private"))
    namespace = body.get("organization") or user
    try:
        repo = api.store.create_repo(kind, namespace, body["name"], user, private)
    except ApiError as e:
        if "repo" in e.body:
            e.body = {"url": req.repo_url(e.body["repo"])}
        raise
    return reply_json({"url": req.repo_url(repo), "name": repo["id"], "id": repo["_id"]})


def delete_repo(api: Api, req: Request) -> Reply:
    user = req.need_user()
    body = require_fields(req.json(), {"name": str}, {"organization": str, "type": str})
    kind = body.get("type") or "model"
    if kind not in KINDS.values():
        raise ApiError(400, f"repo type {kind!r} is not supported by the local hub")
    repo = api.store.writable_repo(kind, f"{body.get('organization') or user}/"
                                         f"{body['name']}", user)
    api.store.delete_repo(repo)
    return reply_json({})


def settings(api: Api, req: Request) -> Reply:
    req.query.allow()
    repo = api.store.writable_repo(req.kind, req.repo_id, req.user)
    body = require_fields(req.json(), {}, {"gated": (str, bool), "visibility": str,
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
    api.store.save_repo(repo)
    return reply_json({})


def grant_access(api: Api, req: Request) -> Reply:
    repo = api.store.writable_repo(req.kind, req.repo_id, req.user)
    body = require_fields(req.json(), {"user": str})
    if not repo["gated"]:
        raise ApiError(400, f"{repo['id']} is not gated")
    if body["user"] not in api.store.users:
        raise ApiError(404, f"user {body['user']!r} not found")
    if body["user"] not in repo["grants"]:
        repo["grants"].append(body["user"])
        api.store.save_repo(repo)
    return reply_json({})


def like(api: Api, req: Request) -> Reply:
    """POST likes a repo, DELETE unlikes it."""
    user = req.need_user()
    repo = api.store.get_repo(req.kind, req.repo_id, user)
    likers = repo["likers"]
    if req.method == "POST" and user not in likers:
        likers.append(user)
    elif req.method == "DELETE" and user in likers:
        likers.remove(user)
    api.store.save_repo(repo)
    return reply_json({})


def read_check(api: Api, req: Request) -> Reply:
    """Whether the caller may download the repo's files (gates included)."""
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    req.check_gate(api.store, repo)
    return reply_json({})


def write_check(api: Api, req: Request) -> Reply:
    """Whether the caller may write to the repo."""
    api.store.writable_repo(req.kind, req.repo_id, req.user)
    return reply_json({})


# ---- repo info

def repo_fields(store: Store, repo: dict, sha: str, names: set[str], blobs: bool) -> dict:
    """The fields of a model or dataset at a commit, as model_info/list_models give them."""
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
        "siblings": lambda: [_sibling(p, e, blobs) for p, e in sorted(tree.items())],
        "safetensors": lambda: derived.get("safetensors"),
        "usedStorage": lambda: sum(e["size"] for e in tree.values()),
        "spaces": lambda: [], "description": lambda: "",
    }
    for name in names:
        value = values[name]()
        if value is not None or name in ("gated", "library_name", "pipeline_tag"):
            out[name] = value
    return out


def _sibling(path: str, entry: dict, blobs: bool) -> dict:
    if not blobs:
        return {"rfilename": path}
    out: dict[str, Any] = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
    if entry["lfs"]:
        out["lfs"] = {"size": entry["size"], "sha256": entry["sha256"],
                      "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
    return out


def expanded_fields(kind: str, values: list[str]) -> set[str]:
    """The fields an `expand` query asks for (400 for fields the local hub does not know)."""
    allowed = MODEL_FIELDS if kind == "model" else DATASET_FIELDS
    unknown = set(values) - allowed
    if unknown:
        raise ApiError(400, f"unsupported expand value(s): {', '.join(sorted(unknown))}; "
                            f"the local hub knows {', '.join(sorted(allowed))}")
    return {"_id", "id", *values}


def info(api: Api, req: Request, rev: str | None = None) -> Reply:
    """model_info / dataset_info at main."""
    q = req.query.allow("blobs", "expand", "securityStatus")
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    sha = api.store.resolve(repo, rev or "main")
    expand = q.all("expand")
    names = expanded_fields(req.kind, expand) if expand else (
        MODEL_FIELDS if req.kind == "model" else DATASET_FIELDS)
    out = repo_fields(api.store, repo, sha, names, q.flag("blobs"))
    if q.flag("securityStatus"):
        out["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
    return reply_json(out)


def warm_info(api: Api, req: Request) -> None:
    """Before model_info / dataset_info, without the store's lock: the derived data (card) of
    the revision it shows. Errors are left to the route."""
    with contextlib.suppress(Exception):
        at_revision = req.match is not None and "rest" in req.match.groupdict()
        rev = take_rev(req.rest)[0] if at_revision else "main"
        with api.store.lock:
            repo = api.store.get_repo(req.kind, req.repo_id, req.user)
            sha = api.store.resolve(repo, rev)
        api.store.derived(repo, sha)


def info_at_revision(api: Api, req: Request) -> Reply:
    """model_info / dataset_info at a revision."""
    return info(api, req, take_rev(req.rest)[0])


# ---- file downloads

def download(api: Api, req: Request) -> Reply:
    """GET or HEAD of a file at a revision: its headers, and its bytes (a range of them)."""
    req.query.allow("download")
    store = api.store
    repo = store.get_repo(req.kind, req.repo_id, req.user)
    req.check_gate(store, repo)
    rev, path_parts = take_rev(req.rest)
    sha = store.resolve(repo, rev)
    path = "/".join(path_parts)
    entry = store.commit(repo, sha)["tree"].get(path)
    if entry is None:
        raise entry_not_found(path, rev, sha)
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
    if req.range:
        wanted = _byte_range(req.range, size)
        if wanted is None:
            return Reply(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
        offset, end = wanted
        length, status = end - offset + 1, 206
        headers["Content-Range"] = f"bytes {offset}-{end}/{size}"
    if req.method == "GET" and offset == 0:
        repo["downloads"] += 1
        store.save_repo(repo)
    return Reply(status, b"", headers, store.blobs.path(entry["sha256"]), offset, length)


def _byte_range(spec: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a Range header, None when it lies outside the file (416)."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise ApiError(416, f"unsupported Range {spec!r}")
    if m.group(1):
        offset = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:
        offset, end = max(0, size - int(m.group(2))), size - 1
    end = min(end, size - 1)
    if offset >= size or end < offset:
        return None
    return offset, end
