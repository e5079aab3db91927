"""The records the local hub keeps, and pure operations on them (no disk, no lock).

Names and paths as the Hub accepts them, times as it writes them, git ids of files, tree
entries, discussion events, and the three-way merge of two trees.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.localhub.errors import ApiError

REPO_TYPES = ("model", "dataset")
NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
RESERVED = {"api", "datasets", "models", "spaces", "kernels", "buckets", "lfs-upload",
            "collections", "organizations", "settings", "new", "docs", "papers"}
SHA1 = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
PR_REF = re.compile(r"^refs/pr/(\d+)$")
MAX_PATH = 1000


def now() -> str:
    """UTC time as the store keeps it (microseconds; the API shows milliseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def api_time(stamp: str) -> str:
    """A stored time as the Hub writes it: milliseconds and Z."""
    return stamp[:23] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in git for an LFS file."""
    spec = "https://git-lfs.github.com/spec/v1"
    return f"version {spec}\noid sha256:{sha256}\nsize {size}\n".encode()


def tree_entry(sha256: str, size: int, data: bytes | None, lfs: bool) -> dict:
    """A file in a commit's tree: git id, sha256 of the content, size, LFS or not."""
    oid = git_blob_oid(lfs_pointer(sha256, size) if lfs else data or b"")
    return {"oid": oid, "sha256": sha256, "size": size, "lfs": lfs}


def valid_name(name: str) -> bool:
    """A user, org or repo name as the Hub accepts it."""
    return bool(NAME.match(name)) and "--" not in name and ".." not in name


def check_path(path: Any) -> str:
    """A path inside a repo: relative, no '..', '.git' or empty parts."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH:
        raise ApiError(400, f"invalid path in repo: {path!r}")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..", ".git") for p in parts) or "\0" in path:
        raise ApiError(400, f"invalid path in repo: {path!r}")
    return path


def write_json(path: Path, data: Any) -> None:
    """Replace a JSON file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ---- discussions and pull requests

def new_event(kind: str, author: str, **data: Any) -> dict:
    """A discussion event as the Hub serializes it."""
    stamp = api_time(now())
    if kind == "comment":
        payload: dict[str, Any] = {
            "edited": False, "hidden": False, "history": [],
            "latest": {"raw": data["raw"], "html": data["raw"], "updatedAt": stamp,
                       "author": {"name": author}}}
    elif kind == "status-change":
        payload = {"status": data["status"]}
    elif kind == "commit":
        payload = {"subject": data["subject"], "oid": data["oid"]}
    else:
        payload = {"from": data["old"], "to": data["new"]}
    return {"id": secrets.token_hex(12), "type": kind, "createdAt": stamp,
            "author": {"name": author}, "data": payload}


def find_discussion(repo: dict, num: int, missing_code: str | None = None) -> dict:
    """A discussion or PR by number (404 with `missing_code` as X-Error-Code when absent)."""
    for d in repo["discussions"]:
        if d["num"] == num:
            return d
    raise ApiError(404, f"Discussion #{num} not found in {repo['id']}", missing_code)


def add_discussion(repo: dict, title: str, description: str, user: str, *,
                   is_pr: bool, base: str | None = None, head: str | None = None,
                   base_commit: str | None = None, status: str = "open",
                   from_commit: bool = False) -> dict:
    """Append a discussion or PR to the repo's record (not saved) and return it."""
    title = title.strip()
    if from_commit:  # a PR opened by a commit is titled by its summary, whatever its length
        title = title[:200]
    elif not 3 <= len(title) <= 200:
        raise ApiError(400, "A title must have 3 to 200 characters")
    num = len(repo["discussions"]) + 1
    d: dict[str, Any] = {"num": num, "title": title, "author": user, "isPullRequest": is_pr,
                         "createdAt": api_time(now()), "status": status, "events": []}
    if description.strip():
        d["events"].append(new_event("comment", user, raw=description))
    if is_pr:
        d.update(base=base or "main", head=head, baseCommit=base_commit, mergeCommitId=None)
    repo["discussions"].append(d)
    return d


def three_way_merge(base: dict, ours: dict, theirs: dict) -> tuple[dict, list[str]]:
    """Merge two trees per file against their common base: (merged tree, conflicting paths)."""
    merged, conflicts = {}, []
    for path in sorted(set(base) | set(ours) | set(theirs)):
        b, o, t = base.get(path), ours.get(path), theirs.get(path)
        if o == t or t == b:
            pick = o
        elif o == b:
            pick = t
        else:
            conflicts.append(path)
            continue
        if pick is not None:
            merged[path] = pick
    return merged, conflicts
