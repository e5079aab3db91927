"""The local hub's storage: users, repos, commits, refs, discussions and blobs, on disk.

Layout under the hub's directory (everything survives a restart):

    users.json                        {name: {"tokens": [...], "orgs": [...]}}
    blobs/ab/abcdef...                file contents, addressed by sha256, shared by all repos
    repos/{models,datasets}/NS/NAME/
        repo.json                     settings, branches, tags, discussions and pull requests
        commits/<sha1>.json           {parents, tree: {path: {oid, sha256, size, lfs}}, ...}

A commit stores its whole tree, so reading a revision is one file. Every write happens under
one lock and replaces files atomically; the server is the only writer of its directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.errors import HubError, UsageError
from bot.localhub import cards

REPO_TYPES = ("model", "dataset")
NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
RESERVED = {"api", "datasets", "models", "spaces", "kernels", "buckets", "lfs-upload",
            "collections", "organizations", "settings", "new", "docs", "papers"}
SHA1 = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
PR_REF = re.compile(r"^refs/pr/(\d+)$")
MAX_PATH = 1000


class ApiError(HubError):
    """A request the hub refuses: an HTTP status, a message and the Hub's X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body or {}


def not_found(repo_id: str) -> ApiError:
    """The Hub's answer for a repo that does not exist or that the caller may not see."""
    return ApiError(404, f"Repository not found: {repo_id}", "RepoNotFound")


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


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class Store:
    """Repos, users and blobs under one directory; every method is safe to call from threads."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.lock = threading.RLock()
        self.users: dict[str, dict] = {}
        self.repos: dict[tuple[str, str], dict] = {}
        self._commits: dict[tuple[str, str, str], dict] = {}
        self._derived: dict[tuple[str, str], dict] = {}
        self._load()

    # ---- loading and saving

    def _load(self) -> None:
        users = self.root / "users.json"
        if users.exists():
            self.users = json.loads(users.read_text())
        for kind in REPO_TYPES:
            for meta in sorted((self.root / "repos" / f"{kind}s").glob("*/*/repo.json")):
                repo = json.loads(meta.read_text())
                self.repos[(repo["type"], repo["id"].lower())] = repo

    def _repo_dir(self, repo: dict) -> Path:
        return self.root / "repos" / f"{repo['type']}s" / repo["id"]

    def save_repo(self, repo: dict) -> None:
        """Write a repo's metadata (settings, refs, discussions)."""
        _write_json(self._repo_dir(repo) / "repo.json", repo)

    def _save_users(self) -> None:
        _write_json(self.root / "users.json", self.users)

    # ---- users

    def add_user(self, name: str, token: str, orgs: Iterable[str] = ()) -> None:
        """Add a user (or a token and orgs to an existing one)."""
        orgs = list(orgs)
        for n in [name, *orgs]:
            if not valid_name(n) or n.lower() in RESERVED:
                raise UsageError(f"invalid user or org name: {n!r}")
        if not isinstance(token, str) or len(token) < 8 or not token.isprintable() or " " in token:
            raise UsageError("a token must be at least 8 printable characters without spaces")
        with self.lock:
            if name in self.org_names():
                raise UsageError(f"{name!r} is an organization, not a user")
            if any(o in self.users for o in orgs):
                raise UsageError(f"an organization cannot have a user's name: {orgs}")
            owner = self.user_for_token(token)
            if owner not in (None, name):
                raise UsageError("that token already belongs to another user")
            user = self.users.setdefault(name, {"tokens": [], "orgs": []})
            if token not in user["tokens"]:
                user["tokens"].append(token)
            user["orgs"] = sorted(set(user["orgs"]) | set(orgs))
            self._save_users()

    def org_names(self) -> set[str]:
        """Every organization some user belongs to."""
        return {o for u in self.users.values() for o in u["orgs"]}

    def user_for_token(self, token: str) -> str | None:
        """The name of the user who owns a token, or None."""
        for name, user in self.users.items():
            if any(secrets.compare_digest(token, t) for t in user["tokens"]):
                return name
        return None

    # ---- permissions

    def can_write(self, user: str | None, repo: dict) -> bool:
        """Owners: the namespace's user or a member of the namespace's org."""
        if user is None:
            return False
        namespace = repo["id"].split("/")[0]
        return namespace == user or namespace in self.users.get(user, {}).get("orgs", [])

    def can_read(self, user: str | None, repo: dict) -> bool:
        """Public repos for everyone, private ones for their owners."""
        return not repo["private"] or self.can_write(user, repo)

    def can_download(self, user: str | None, repo: dict) -> bool:
        """Gated repos' files for owners and granted users only."""
        return self.can_read(user, repo) and (
            not repo["gated"] or self.can_write(user, repo) or user in repo["grants"])

    # ---- repos

    def get_repo(self, kind: str, repo_id: str, user: str | None) -> dict:
        """A repo the user may see, else the Hub's 404."""
        repo = self.repos.get((kind, repo_id.lower()))
        if repo is None or not self.can_read(user, repo):
            raise not_found(repo_id)
        return repo

    def writable_repo(self, kind: str, repo_id: str, user: str | None) -> dict:
        """A repo the user may write to: 404 if unseen, 401 anonymous, 403 not an owner."""
        repo = self.get_repo(kind, repo_id, user)
        if user is None:
            raise ApiError(401, "You must be authenticated (Authorization: Bearer <token>)")
        if not self.can_write(user, repo):
            raise ApiError(403, f"You don't have write access to {repo['id']}; open a pull "
                                "request instead (create_pr=True)")
        return repo

    def create_repo(self, kind: str, namespace: str, name: str, user: str,
                    private: bool) -> dict:
        """A new repo with the Hub's initial commit (a .gitattributes file)."""
        if kind not in REPO_TYPES:
            raise ApiError(400, f"repo type {kind!r} is not supported by the local hub "
                                "(models and datasets only)")
        if not valid_name(name):
            raise ApiError(400, f"invalid repo name {name!r}: use letters, digits, '-', '_', "
                                "'.', no '--' or '..', at most 96 characters")
        repo_id = f"{namespace}/{name}"
        with self.lock:
            if namespace != user and namespace not in self.users[user]["orgs"]:
                raise ApiError(403, f"You don't have the rights to create a {kind} under the "
                                    f"namespace {namespace!r}")
            existing = self.repos.get((kind, repo_id.lower()))
            if existing is not None:  # the Hub's answer carries the url (exist_ok reads it)
                raise ApiError(409, f"You already created this {kind} repo: {existing['id']}",
                               body={"repo": existing})
            stamp = now()
            repo = {"type": kind, "id": repo_id, "_id": secrets.token_hex(12),
                    "private": bool(private), "gated": False, "grants": [], "likers": [],
                    "downloads": 0, "createdAt": stamp, "lastModified": stamp,
                    "branches": {}, "tags": {}, "discussions": [], "seq": 0}
            data = cards.DEFAULT_GITATTRIBUTES.encode()
            tree = {".gitattributes": self._entry(self.put_blob(data), len(data), data, False)}
            sha = self._write_commit(repo, [], tree, "initial commit", "", user)
            repo["branches"]["main"] = sha
            self.repos[(kind, repo_id.lower())] = repo
            self.save_repo(repo)
            return repo

    def delete_repo(self, repo: dict) -> None:
        """Remove a repo with its commits and discussions (blobs stay)."""
        with self.lock:
            self.repos.pop((repo["type"], repo["id"].lower()), None)
            shutil.rmtree(self._repo_dir(repo), ignore_errors=True)
            parent = self._repo_dir(repo).parent
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()

    def list_repos(self, kind: str, user: str | None) -> list[dict]:
        """Every repo of a type the user may see."""
        with self.lock:
            return [r for (k, _), r in self.repos.items() if k == kind and self.can_read(user, r)]

    # ---- blobs

    def blob_path(self, sha256: str) -> Path:
        """Where a blob lives (whether or not it exists)."""
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        """Whether a blob is stored (with that size, when given)."""
        path = self.blob_path(sha256)
        return path.exists() and (size is None or path.stat().st_size == size)

    def put_blob(self, data: bytes) -> str:
        """Store bytes; return their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha):
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._adopt(tmp, sha)
        return sha

    def new_upload(self) -> tuple[Any, str]:
        """An open temporary file for a streamed upload, and its path."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        return os.fdopen(fd, "wb"), tmp

    def finish_upload(self, tmp: str, sha256: str) -> None:
        """Move a verified upload into the blob store."""
        if self.has_blob(sha256):
            os.unlink(tmp)
        else:
            self._adopt(tmp, sha256)

    def _adopt(self, tmp: str, sha: str) -> None:
        path = self.blob_path(sha)
        path.parent.mkdir(exist_ok=True)
        os.replace(tmp, path)

    def read_blob(self, sha256: str) -> bytes:
        """A blob's bytes."""
        return self.blob_path(sha256).read_bytes()

    def read_head(self, sha256: str, n: int) -> bytes:
        """A blob's first n bytes."""
        with open(self.blob_path(sha256), "rb") as f:
            return f.read(n)

    @staticmethod
    def _entry(sha256: str, size: int, data: bytes | None, lfs: bool) -> dict:
        oid = git_blob_oid(lfs_pointer(sha256, size) if lfs else data or b"")
        return {"oid": oid, "sha256": sha256, "size": size, "lfs": lfs}

    # ---- commits and revisions

    def commit(self, repo: dict, sha: str) -> dict:
        """A commit of the repo by its full sha (404 RevisionNotFound if absent)."""
        key = (repo["type"], repo["id"], sha)
        cached = self._commits.get(key)
        if cached is not None:
            return cached
        path = self._repo_dir(repo) / "commits" / f"{sha}.json"
        if not SHA1.match(sha) or not path.exists():
            raise ApiError(404, f"Invalid rev id: {sha}", "RevisionNotFound")
        data = json.loads(path.read_text())
        self._commits[key] = data
        return data

    def resolve(self, repo: dict, rev: str) -> str:
        """A revision (branch, tag, refs/..., PR ref, full or short sha) -> commit sha."""
        with self.lock:
            name = rev.removeprefix("refs/heads/")
            if name in repo["branches"]:
                return repo["branches"][name]
            name = rev.removeprefix("refs/tags/")
            if name in repo["tags"]:
                return repo["tags"][name]["commit"]
            pr = PR_REF.match(rev)
            if pr:
                d = self.discussion(repo, int(pr.group(1)), missing_code="RevisionNotFound")
                if d["isPullRequest"]:
                    return d["head"]
            found = self.commit_by_prefix(repo, rev) if re.fullmatch(r"[0-9a-f]{7,40}", rev) \
                else None
            if found is None:
                raise ApiError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return found

    def commit_by_prefix(self, repo: dict, prefix: str) -> str | None:
        """The one commit whose sha starts with a hex prefix (5 or more digits), or None."""
        if not re.fullmatch(r"[0-9a-f]{5,40}", prefix):
            return None
        found = [p.stem for p in (self._repo_dir(repo) / "commits").glob(f"{prefix}*.json")]
        return found[0] if len(found) == 1 else None

    def _write_commit(self, repo: dict, parents: list[str], tree: dict, title: str,
                      message: str, author: str) -> str:
        repo["seq"] += 1
        body = {"parents": parents, "tree": tree, "title": title, "message": message,
                "author": author, "date": now(), "seq": repo["seq"]}
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode(),
                           usedforsecurity=False).hexdigest()
        body["id"] = sha
        _write_json(self._repo_dir(repo) / "commits" / f"{sha}.json", body)
        self._commits[(repo["type"], repo["id"], sha)] = body
        return sha

    def derived(self, repo: dict, sha: str) -> dict:
        """Card data, tags, library... of a commit (memoized: commits never change)."""
        key = (repo["type"], sha)
        if key not in self._derived:
            tree = self.commit(repo, sha)["tree"]
            self._derived[key] = cards.derive(repo["type"], tree, self.read_blob, self.read_head)
        return self._derived[key]

    def ancestors(self, repo: dict, sha: str) -> list[dict]:
        """A commit and every commit before it, newest first."""
        seen: dict[str, dict] = {}
        stack = [sha]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            commit = self.commit(repo, current)
            seen[current] = commit
            stack.extend(commit["parents"])
        return sorted(seen.values(), key=lambda c: c["seq"], reverse=True)

    def apply_commit(self, repo: dict, *, branch: str | None, pr_num: int | None,
                     create_pr: bool, operations: list[tuple[str, dict]], header: dict,
                     user: str) -> dict:
        """Apply parsed commit operations to a branch, a PR ref, or a new PR.

        Returns {"sha", "pr"} (pr: the discussion when one was created or pushed to).
        """
        with self.lock:
            parent_given = header.get("parentCommit")
            pr = None
            if pr_num is not None:
                pr = self.discussion(repo, pr_num, missing_code="RevisionNotFound")
                if not pr["isPullRequest"] or pr["status"] not in ("open", "draft"):
                    raise ApiError(400, f"refs/pr/{pr_num} is not an open pull request")
                if user != pr["author"] and not self.can_write(user, repo):
                    raise ApiError(403, "Only the pull request's author or the repo's owners "
                                        "can push to it")
                head = pr["head"]
            else:
                assert branch is not None
                if branch not in repo["branches"]:
                    raise ApiError(404, f"Invalid rev id: {branch} is not a branch",
                                   "RevisionNotFound")
                head = repo["branches"][branch]
            parent = head
            if parent_given is not None:
                full = self.commit_by_prefix(repo, parent_given)
                if create_pr:
                    if full is None:
                        raise ApiError(404, f"Invalid rev id: parent commit {parent_given}",
                                       "RevisionNotFound")
                    parent = full
                elif full != head:
                    raise ApiError(412, "A commit has happened since. Please refresh and try "
                                        f"again. (parent commit {parent_given} is not the head "
                                        f"{head} of {branch or f'refs/pr/{pr_num}'})")
            tree = dict(self.commit(repo, parent)["tree"])
            self._apply_operations(tree, operations)
            paths = sorted(tree)
            for a, b in zip(paths, paths[1:], strict=False):
                if b.startswith(a + "/"):
                    raise ApiError(400, f"{a!r} would be both a file and a folder")
            if "README.md" in tree and tree["README.md"] != \
                    self.commit(repo, parent)["tree"].get("README.md"):
                try:
                    cards.parse_front_matter(self.read_blob(tree["README.md"]["sha256"])
                                             .decode("utf-8", "replace"))
                except cards.CardError as e:
                    raise ApiError(400, f"Invalid metadata in README.md: {e}") from e
            sha = self._write_commit(repo, [parent], tree, header["summary"],
                                     header.get("description", ""), user)
            if create_pr:
                pr = self._new_discussion(repo, header["summary"], header.get("description", ""),
                                          user, is_pr=True, base=branch, head=sha,
                                          base_commit=parent, status="open",
                                          from_commit=True)
            if pr is not None:
                pr["head"] = sha
                if pr["status"] == "draft":
                    pr["status"] = "open"
                pr["events"].append(self.event("commit", user, subject=header["summary"],
                                               oid=sha))
            else:
                repo["branches"][branch] = sha
                if branch == "main":
                    repo["lastModified"] = self.commit(repo, sha)["date"]
            self.save_repo(repo)
            return {"sha": sha, "pr": pr}

    def _apply_operations(self, tree: dict, operations: list[tuple[str, dict]]) -> None:
        for key, value in operations:
            path = value["path"]
            if key == "file":
                data = value["data"]
                tree[path] = self._entry(self.put_blob(data), len(data), data, False)
            elif key == "lfsFile":
                oid = value["oid"]
                path_blob = self.blob_path(oid)
                if not path_blob.exists():
                    raise ApiError(400, f"LFS object {oid} for {path!r} was not uploaded "
                                        "(preupload and the LFS batch come first)")
                size = path_blob.stat().st_size
                if value.get("size") not in (None, size):
                    raise ApiError(400, f"size mismatch for {path!r}: stored LFS object has "
                                        f"{size} bytes, the commit says {value['size']}")
                tree[path] = self._entry(oid, size, None, True)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise ApiError(404, f"A file with this name doesn't exist: {path}",
                                   "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)]
                if not doomed:
                    raise ApiError(404, f"A folder with this name doesn't exist: {path}",
                                   "EntryNotFound")
                for p in doomed:
                    del tree[p]

    # ---- refs

    def create_branch(self, repo: dict, branch: str, start: str | None, user: str) -> None:
        """A new branch at a revision (default: main's head)."""
        with self.lock:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}", branch) or \
                    branch.startswith("refs/") or ".." in branch or branch.endswith("/"):
                raise ApiError(400, f"Invalid branch name: {branch!r}")
            if branch in repo["branches"]:
                raise ApiError(409, f"Reference already exists: refs/heads/{branch}")
            repo["branches"][branch] = self.resolve(repo, start or "main")
            self.save_repo(repo)

    def delete_branch(self, repo: dict, branch: str) -> None:
        """Remove a branch (not main)."""
        with self.lock:
            if branch == "main":
                raise ApiError(400, "The default branch 'main' cannot be deleted")
            if repo["branches"].pop(branch, None) is None:
                raise ApiError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            self.save_repo(repo)

    def create_tag(self, repo: dict, tag: str, rev: str, message: str) -> None:
        """A tag on a revision."""
        with self.lock:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}", tag) or ".." in tag:
                raise ApiError(400, f"Invalid tag name: {tag!r}")
            if tag in repo["tags"]:
                raise ApiError(409, f"Tag already exists: refs/tags/{tag}")
            repo["tags"][tag] = {"commit": self.resolve(repo, rev), "message": message}
            self.save_repo(repo)

    def delete_tag(self, repo: dict, tag: str) -> None:
        """Remove a tag."""
        with self.lock:
            if repo["tags"].pop(tag, None) is None:
                raise ApiError(404, f"Invalid rev id: tag {tag} not found", "RevisionNotFound")
            self.save_repo(repo)

    # ---- discussions and pull requests

    @staticmethod
    def event(kind: str, author: str, **data: Any) -> dict:
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

    def discussion(self, repo: dict, num: int, missing_code: str | None = None) -> dict:
        """A discussion or PR by number."""
        for d in repo["discussions"]:
            if d["num"] == num:
                return d
        raise ApiError(404, f"Discussion #{num} not found in {repo['id']}", missing_code)

    def _new_discussion(self, repo: dict, title: str, description: str, user: str, *,
                        is_pr: bool, base: str | None = None, head: str | None = None,
                        base_commit: str | None = None, status: str = "open",
                        from_commit: bool = False) -> dict:
        title = title.strip()
        if from_commit:  # a PR opened by a commit is titled by its summary, whatever its length
            title = title[:200]
        elif not 3 <= len(title) <= 200:
            raise ApiError(400, "A title must have 3 to 200 characters")
        num = len(repo["discussions"]) + 1
        d: dict[str, Any] = {"num": num, "title": title, "author": user, "isPullRequest": is_pr,
                             "createdAt": api_time(now()), "status": status, "events": []}
        if description.strip():
            d["events"].append(self.event("comment", user, raw=description))
        if is_pr:
            d.update(base=base or "main", head=head, baseCommit=base_commit,
                     mergeCommitId=None)
        repo["discussions"].append(d)
        return d

    def create_discussion(self, repo: dict, title: str, description: str, user: str,
                          pull_request: bool) -> dict:
        """A discussion, or a draft PR with no commit yet (its ref at main's head)."""
        with self.lock:
            head = repo["branches"]["main"] if pull_request else None
            d = self._new_discussion(repo, title, description, user, is_pr=pull_request,
                                     base="main", head=head, base_commit=head,
                                     status="draft" if pull_request else "open")
            self.save_repo(repo)
            return d

    def may_moderate(self, user: str, repo: dict, d: dict) -> bool:
        """The discussion's author or the repo's owners."""
        return user == d["author"] or self.can_write(user, repo)

    def merge(self, repo: dict, d: dict, user: str, comment: str | None) -> str:
        """Merge a PR into its base branch: fast-forward, or a merge commit; returns the sha."""
        with self.lock:
            if not d["isPullRequest"]:
                raise ApiError(400, f"#{d['num']} is a discussion, not a pull request")
            if d["status"] not in ("open", "draft"):
                raise ApiError(400, f"Pull request #{d['num']} is {d['status']}")
            if not any(e["type"] == "commit" for e in d["events"]):
                raise ApiError(400, f"Pull request #{d['num']} has no commits to merge")
            branch = d["base"]
            target = repo["branches"].get(branch)
            if target is None:
                raise ApiError(400, f"The pull request's base branch {branch!r} was deleted")
            head_history = {c["id"] for c in self.ancestors(repo, d["head"])}
            if target in head_history:
                sha = d["head"]
            else:
                sha = self._merge_commit(repo, d, target, branch, user)
            repo["branches"][branch] = sha
            if branch == "main":
                repo["lastModified"] = self.commit(repo, sha)["date"]
            if comment:
                d["events"].append(self.event("comment", user, raw=comment))
            d["events"].append(self.event("status-change", user, status="merged"))
            d["status"] = "merged"
            d["mergeCommitId"] = sha
            self.save_repo(repo)
            return sha

    def _merge_commit(self, repo: dict, d: dict, target: str, branch: str, user: str) -> str:
        ours_history = {c["id"] for c in self.ancestors(repo, target)}
        base = next(c for c in self.ancestors(repo, d["head"]) if c["id"] in ours_history)
        base_tree = base["tree"]
        ours = self.commit(repo, target)["tree"]
        theirs = self.commit(repo, d["head"])["tree"]
        merged, conflicts = {}, []
        for path in sorted(set(base_tree) | set(ours) | set(theirs)):
            b, o, t = base_tree.get(path), ours.get(path), theirs.get(path)
            if o == t or t == b:
                pick = o
            elif o == b:
                pick = t
            else:
                conflicts.append(path)
                continue
            if pick is not None:
                merged[path] = pick
        if conflicts:
            raise ApiError(409, f"Pull request #{d['num']} conflicts with {branch} in: "
                                + ", ".join(conflicts))
        return self._write_commit(repo, [target, d["head"]], merged,
                                  f"Merge pull request #{d['num']}: {d['title']}", "", user)
