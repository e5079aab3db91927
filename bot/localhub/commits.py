"""Routes that write: preupload, commits (NDJSON), LFS uploads, branches and tags.

LFS objects travel in two steps: the batch endpoint answers each object with an upload URL
signed by the hub (the client sends no token there), and the server streams the PUT to that
URL into the blob store (server.py), checked against the signed sha256 and size.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from bot.localhub import cards
from bot.localhub.errors import ApiError
from bot.localhub.protocol import Query, Reply, Request, reply_json, require_fields, take_rev
from bot.localhub.records import PR_REF, SHA256, check_path, find_discussion

if TYPE_CHECKING:
    from bot.localhub.api import Api

XET = ("Xet storage is not supported by the local hub: set HF_HUB_DISABLE_XET=1 (before "
       "huggingface_hub is imported) so that uploads go through LFS")
LFS_JSON = "application/vnd.git-lfs+json"


def refuse_xet(api: Api, req: Request) -> Reply:
    """Any xet-* route: a 400 that names the setting that avoids Xet."""
    raise ApiError(400, XET)


# ---- commits

def _commit_target(api: Api, req: Request, repo: dict, rev: str, create_pr: bool
                   ) -> tuple[str | None, int | None]:
    """(branch, PR number) a commit or preupload aims at, with the permission checks."""
    user = req.need_user()
    pr = PR_REF.match(rev)
    if pr:
        if create_pr:
            raise ApiError(400, "create_pr needs a branch as revision, not a PR ref")
        d = find_discussion(repo, int(pr.group(1)), "RevisionNotFound")
        if not api.store.may_moderate(user, repo, d):
            raise ApiError(403, "Only the pull request's author or the repo's owners can "
                                "push to it")
        return None, int(pr.group(1))
    branch = rev.removeprefix("refs/heads/")
    if branch not in repo["branches"]:
        api.store.resolve(repo, rev)  # 404 RevisionNotFound when it is nothing at all
        raise ApiError(400, f"Invalid rev id: {rev} is not a branch; commits go to a branch "
                            "or a pull request ref (refs/pr/N)")
    if not create_pr and not api.store.can_write(user, repo):
        raise ApiError(403, f"You don't have write access to {repo['id']}; open a pull "
                            "request instead (create_pr=True)")
    return branch, None


def preupload(api: Api, req: Request) -> Reply:
    """Which files go through LFS, and the stored ids of files that exist already."""
    q = req.query.allow("create_pr")
    store = api.store
    repo = store.get_repo(req.kind, req.repo_id, req.user)
    rev, _ = take_rev(req.rest)
    _commit_target(api, req, repo, rev, q.flag("create_pr"))
    body = require_fields(req.json(), {"files": list}, {"gitIgnore": str})
    sha = store.resolve(repo, rev)
    tree = store.commit(repo, sha)["tree"]
    attributes = tree.get(".gitattributes")
    patterns = cards.lfs_patterns(
        store.blobs.read(attributes["sha256"]).decode("utf-8", "replace")
        if attributes else cards.DEFAULT_GITATTRIBUTES)
    files = []
    for i, f in enumerate(body["files"]):
        f = require_fields(f, {"path": str, "sample": str, "size": int}, what=f"files[{i}]")
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


def prepare_commit(api: Api, req: Request) -> None:
    """Before the store's lock: parse the payload (kept for `commit`, errors too) and the
    metadata of a README.md it adds, so that a slow card holds up no one else."""
    try:
        req.prepared = parse_commit_payload(req)
    except ApiError as e:
        req.prepared = e
        return
    for key, op in req.prepared[1]:
        if op["path"] != "README.md" or key not in ("file", "lfsFile"):
            continue
        data = op.get("data")
        sha = hashlib.sha256(data).hexdigest() if data is not None else op["oid"]
        if data is not None or api.store.blobs.has(sha):
            with contextlib.suppress(cards.CardError, OSError):  # the commit refuses it
                api.store.meta.card(sha, data)


def commit(api: Api, req: Request) -> Reply:
    """create_commit: to a branch, to refs/pr/N, or opening a pull request (create_pr)."""
    q = req.query.allow("create_pr", "hot_reload")
    if q.flag("hot_reload"):
        raise ApiError(400, "hot_reload is for Spaces, which the local hub does not have")
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    rev, _ = take_rev(req.rest)
    create_pr = q.flag("create_pr")
    branch, pr_num = _commit_target(api, req, repo, rev, create_pr)
    if isinstance(req.prepared, ApiError):
        raise req.prepared
    header, operations = req.prepared or parse_commit_payload(req)
    for key, op in operations:  # a stored blob is named only by who may read it
        if key == "lfsFile" and not api.store.may_use_blob(req.user, repo, op["oid"]):
            raise ApiError(400, f"LFS object {op['oid']} for {op['path']!r} was not uploaded "
                                "(preupload and the LFS batch come first)")
    result = api.store.apply_commit(repo, branch=branch, pr_num=pr_num, create_pr=create_pr,
                                    operations=operations, header=header, user=req.user)
    out = {"success": True, "commitOid": result["sha"], "hookOutput": "",
           "commitUrl": f"{req.repo_url(repo)}/commit/{result['sha']}"}
    if result["pr"] is not None:
        out["pullRequestUrl"] = f"{req.repo_url(repo)}/discussions/{result['pr']['num']}"
    return reply_json(out)


def parse_commit_payload(req: Request) -> tuple[dict, list[tuple[str, dict]]]:
    """The NDJSON commit payload: its header line, then (key, value) operations."""
    if not req.content_type.startswith("application/x-ndjson"):
        raise ApiError(400, "a commit payload must be application/x-ndjson")
    lines = [line for line in req.payload().split(b"\n") if line.strip()]
    if not lines:
        raise ApiError(400, "empty commit payload")
    header: dict | None = None
    operations: list[tuple[str, dict]] = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except ValueError as e:
            raise ApiError(400, f"commit payload line {n} is not JSON") from e
        item = require_fields(item, {"key": str, "value": dict},
                              what=f"commit payload line {n}")
        key, value = item["key"], item["value"]
        where = f"commit payload line {n} ({key})"
        if n == 1 and key != "header":
            raise ApiError(400, "the first line of a commit payload must be the header")
        if key == "header":
            if n != 1:
                raise ApiError(400, f"{where}: only the first line can be a header")
            header = _commit_header(value, where)
        elif key in OPERATIONS:
            operations.append((key, OPERATIONS[key](value, where)))
        else:
            raise ApiError(400, f"unknown key {key!r} in commit payload line {n}: expected "
                                "header, file, lfsFile, deletedFile or deletedFolder")
    assert header is not None
    return header, operations


def _commit_header(value: dict, where: str) -> dict:
    header = require_fields(value, {"summary": str}, {"description": str, "parentCommit": str},
                            where)
    if not header["summary"].strip():
        raise ApiError(400, "the commit summary (message) cannot be empty")
    parent = header.get("parentCommit")
    if parent is not None and not re.fullmatch(r"[0-9a-fA-F]{5,40}", parent):
        raise ApiError(400, f"{where}: parentCommit is not a commit id")
    if parent is not None:
        header["parentCommit"] = parent.lower()
    return header


def _file_operation(value: dict, where: str) -> dict:
    value = require_fields(value, {"path": str, "content": str}, {"encoding": str}, where)
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
    return {"path": check_path(value["path"]), "data": data}


def _lfs_file_operation(value: dict, where: str) -> dict:
    value = require_fields(value, {"path": str, "oid": str}, {"algo": str, "size": int}, where)
    if value.get("algo", "sha256") != "sha256" or not SHA256.match(value["oid"]):
        raise ApiError(400, f"{where}: oid must be a sha256 (64 lowercase hex)")
    return {**value, "path": check_path(value["path"])}


def _deleted_file_operation(value: dict, where: str) -> dict:
    value = require_fields(value, {"path": str}, what=where)
    return {"path": check_path(value["path"])}


def _deleted_folder_operation(value: dict, where: str) -> dict:
    value = require_fields(value, {"path": str}, what=where)
    return {"path": check_path(value["path"].rstrip("/"))}


OPERATIONS = {"file": _file_operation, "lfsFile": _lfs_file_operation,
              "deletedFile": _deleted_file_operation, "deletedFolder": _deleted_folder_operation}


# ---- branches and tags

MISSING_NAME = {"branch": "missing branch name", "tag": "missing revision or tag in the URL"}


def _ref_name(api: Api, req: Request) -> tuple[dict, str]:
    """The writable repo and the name at the end of a .../branch/... or .../tag/... URL."""
    req.query.allow()
    repo = api.store.writable_repo(req.kind, req.repo_id, req.user)
    name = "/".join(req.rest)
    if not name:
        raise ApiError(400, MISSING_NAME[req.arg("ref")])
    return repo, name


def create_branch(api: Api, req: Request) -> Reply:
    """POST .../branch/NAME {startingPoint}."""
    repo, name = _ref_name(api, req)
    body = require_fields(req.json(allow_empty=True), {}, {"startingPoint": str})
    api.store.create_branch(repo, name, body.get("startingPoint"), req.user)
    return reply_json({})


def create_tag(api: Api, req: Request) -> Reply:
    """POST .../tag/REVISION {tag, message}: the URL names the revision, the body the tag."""
    repo, rev = _ref_name(api, req)
    body = require_fields(req.json(), {"tag": str}, {"message": str})
    api.store.create_tag(repo, body["tag"], rev, body.get("message") or "")
    return reply_json({})


def delete_ref(api: Api, req: Request) -> Reply:
    """DELETE .../branch/NAME or .../tag/NAME."""
    repo, name = _ref_name(api, req)
    delete = api.store.delete_branch if req.arg("ref") == "branch" else api.store.delete_tag
    delete(repo, name)
    return reply_json({})


# ---- LFS

def lfs_objects(api: Api, req: Request) -> Reply:
    """POST /{repo}.git/info/lfs/objects/{batch,verify}, for a logged-in user who sees it.

    The hub says it has an object only when the user may name it in a commit (access.py):
    others are asked for its bytes, and learn nothing of what other repos hold.
    """
    req.query.allow()
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    req.need_user()
    if req.arg("op") == "verify":
        return _lfs_verify(api, req, repo)
    if req.arg("op") != "batch":
        raise req.unknown()
    return _lfs_batch(api, req, repo)


def _has(api: Api, req: Request, repo: dict, oid: str, size: int) -> bool:
    """Whether the hub holds this object for this user (see lfs_objects)."""
    return api.store.blobs.has(oid, size) and api.store.may_use_blob(req.need_user(), repo, oid)


def _lfs_verify(api: Api, req: Request, repo: dict) -> Reply:
    body = require_fields(req.json(), {"oid": str, "size": int})
    if not SHA256.match(body["oid"]) or not _has(api, req, repo, body["oid"], body["size"]):
        raise ApiError(404, f"LFS object {body['oid']} ({body['size']} bytes) not found")
    return reply_json({}, content_type=LFS_JSON)


def _lfs_batch(api: Api, req: Request, repo: dict) -> Reply:
    body = require_fields(req.json(), {"operation": str, "objects": list},
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
        obj = require_fields(obj, {"oid": str, "size": int}, what=f"objects[{i}]")
        oid, size = obj["oid"], obj["size"]
        if not SHA256.match(oid) or size < 0:
            raise ApiError(400, f"objects[{i}]: oid must be a sha256 and size >= 0")
        if _has(api, req, repo, oid, size):
            objects.append({"oid": oid, "size": size})
            continue
        user = req.need_user()
        sig = _sign(api, oid, size, user)
        objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
            "upload": {"href": f"{req.base}/lfs-upload/{oid}?size={size}&user={quote(user)}"
                               f"&sig={sig}",
                       "expires_in": 86400},
            "verify": {"href": f"{req.base}/{req.prefix(req.kind)}{repo['id']}.git/info/lfs/"
                               "objects/verify"}}})
    return reply_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                      content_type=LFS_JSON)


def _sign(api: Api, oid: str, size: int, user: str) -> str:
    return hmac.new(api.secret, f"{oid}:{size}:{user}".encode(), hashlib.sha256).hexdigest()


def check_upload(api: Api, path: str, query: Query) -> tuple[str, int, str]:
    """The oid, size and user an LFS upload URL was signed for (403 when the signature is
    wrong)."""
    segs = path.split("/")
    q = query.allow("size", "user", "sig")
    oid = segs[2] if len(segs) == 3 else ""
    size = q.int("size", -1)
    user = q.one("user") or ""
    sig = q.one("sig") or ""
    if not SHA256.match(oid) or size < 0 or not user or \
            not hmac.compare_digest(sig, _sign(api, oid, size, user)):
        raise ApiError(403, "invalid or expired LFS upload URL")
    return oid, size, user
