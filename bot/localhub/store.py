"""The local hub's storage: users, repos, commits, refs and discussions, on disk.

Layout under the hub's directory (everything survives a restart):

    users.json                        {name: {"tokens": [...], "orgs": [...]}}
    blobs/ab/abcdef...                file contents, addressed by sha256 (blobs.py)
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
import threading
from collections.abc import Iterable
from pathlib import Path

from bot.localhub import cards
from bot.localhub.access import BlobAccess
from bot.localhub.blobs import Blobs
from bot.localhub.errors import ApiError, LocalHubUsageError, not_found
from bot.localhub.metadata import Metadata
from bot.localhub.records import (
    PR_REF,
    REPO_TYPES,
    RESERVED,
    SHA1,
    add_discussion,
    find_discussion,
    new_event,
    now,
    three_way_merge,
    tree_entry,
    valid_name,
    write_json,
)


class Store:
    """Repos, users and blobs under one directory; every method is safe to call from threads."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = Blobs(self.root)
        self.lock = threading.RLock()
        self.users: dict[str, dict] = {}
        self.repos: dict[tuple[str, str], dict] = {}
        self._commits: dict[tuple[str, str, str], dict] = {}
        self.meta = Metadata(self.blobs)  # card data and tags, derived outside the lock
        self.access = BlobAccess()  # which stored blobs a user may name in a commit
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
        write_json(self._repo_dir(repo) / "repo.json", repo)

    # ---- users

    def add_user(self, name: str, token: str, orgs: Iterable[str] = ()) -> None:
        """Add a user (or a token and orgs to an existing one)."""
        orgs = list(orgs)
        for n in [name, *orgs]:
            if not valid_name(n) or n.lower() in RESERVED:
                raise LocalHubUsageError(f"invalid user or org name: {n!r}")
        if not isinstance(token, str) or len(token) < 8 or not token.isprintable() or " " in token:
            raise LocalHubUsageError("a token must be at least 8 printable characters without "
                                     "spaces")
        with self.lock:
            if name in self.org_names():
                raise LocalHubUsageError(f"{name!r} is an organization, not a user")
            if any(o in self.users for o in orgs):
                raise LocalHubUsageError(f"an organization cannot have a user's name: {orgs}")
            owner = self.user_for_token(token)
            if owner not in (None, name):
                raise LocalHubUsageError("that token already belongs to another user")
            user = self.users.setdefault(name, {"tokens": [], "orgs": []})
            if token not in user["tokens"]:
                user["tokens"].append(token)
            user["orgs"] = sorted(set(user["orgs"]) | set(orgs))
            write_json(self.root / "users.json", self.users)

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

    def may_moderate(self, user: str, repo: dict, d: dict) -> bool:
        """A discussion's author or the repo's owners."""
        return user == d["author"] or self.can_write(user, repo)

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
            tree = {".gitattributes": tree_entry(self.blobs.put(data), len(data), data, False)}
            sha = self._write_commit(repo, [], tree, "initial commit", "", user)
            repo["branches"]["main"] = sha
            self.repos[(kind, repo_id.lower())] = repo
            self.save_repo(repo)
            return repo

    def delete_repo(self, repo: dict) -> None:
        """Remove a repo with its commits and discussions (blobs stay)."""
        with self.lock:
            self.repos.pop((repo["type"], repo["id"].lower()), None)
            self.access.forget(repo)
            shutil.rmtree(self._repo_dir(repo), ignore_errors=True)
            parent = self._repo_dir(repo).parent
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()

    def list_repos(self, kind: str, user: str | None) -> list[dict]:
        """Every repo of a type the user may see."""
        with self.lock:
            return [r for (k, _), r in self.repos.items() if k == kind and self.can_read(user, r)]

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
                d = find_discussion(repo, int(pr.group(1)), missing_code="RevisionNotFound")
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
        write_json(self._repo_dir(repo) / "commits" / f"{sha}.json", body)
        self._commits[(repo["type"], repo["id"], sha)] = body
        self.access.add_tree(repo, tree)
        return sha

    def derived(self, repo: dict, sha: str) -> dict:
        """Card data, tags, library... of a commit (metadata.py; memoized)."""
        return self.meta.derived(repo["type"], sha, self.commit(repo, sha)["tree"])

    def may_use_blob(self, user: str, repo: dict, sha256: str) -> bool:
        """Whether a commit of `user` to `repo` may name this stored blob (access.py)."""
        commits = (self._repo_dir(repo) / "commits").glob("*.json")
        return self.access.may_use(user, sha256, repo, self.can_download(user, repo), lambda: (
            self.commit(repo, p.stem)["tree"] for p in commits if SHA1.match(p.stem)))

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

    # ---- writing commits

    def apply_commit(self, repo: dict, *, branch: str | None, pr_num: int | None,
                     create_pr: bool, operations: list[tuple[str, dict]], header: dict,
                     user: str) -> dict:
        """Apply parsed commit operations to a branch, a PR ref, or a new PR.

        Returns {"sha", "pr"} (pr: the discussion when one was created or pushed to).
        """
        with self.lock:
            pr = None if pr_num is None else self._pr_to_push(repo, pr_num, user)
            head = pr["head"] if pr is not None else self._branch_head(repo, branch)
            parent = self._parent(repo, head, header.get("parentCommit"), create_pr,
                                  branch or f"refs/pr/{pr_num}")
            parent_tree = self.commit(repo, parent)["tree"]
            tree = dict(parent_tree)
            self._apply_operations(tree, operations)
            self._check_tree(tree, parent_tree)
            sha = self._write_commit(repo, [parent], tree, header["summary"],
                                     header.get("description", ""), user)
            if create_pr:
                pr = add_discussion(repo, header["summary"], header.get("description", ""),
                                    user, is_pr=True, base=branch, head=sha,
                                    base_commit=parent, status="open", from_commit=True)
            if pr is not None:
                pr["head"] = sha
                if pr["status"] == "draft":
                    pr["status"] = "open"
                pr["events"].append(new_event("commit", user, subject=header["summary"],
                                              oid=sha))
            else:
                self._move_branch(repo, branch, sha)
            self.save_repo(repo)
            return {"sha": sha, "pr": pr}

    def _pr_to_push(self, repo: dict, pr_num: int, user: str) -> dict:
        """The open pull request refs/pr/N, when the user may push to it."""
        pr = find_discussion(repo, pr_num, missing_code="RevisionNotFound")
        if not pr["isPullRequest"] or pr["status"] not in ("open", "draft"):
            raise ApiError(400, f"refs/pr/{pr_num} is not an open pull request")
        if user != pr["author"] and not self.can_write(user, repo):
            raise ApiError(403, "Only the pull request's author or the repo's owners "
                                "can push to it")
        return pr

    @staticmethod
    def _branch_head(repo: dict, branch: str | None) -> str:
        assert branch is not None
        if branch not in repo["branches"]:
            raise ApiError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
        return repo["branches"][branch]

    def _parent(self, repo: dict, head: str, parent_given: str | None, create_pr: bool,
                ref: str) -> str:
        """The commit a new commit goes on: the head, or the parent the client named."""
        if parent_given is None:
            return head
        full = self.commit_by_prefix(repo, parent_given)
        if create_pr:
            if full is None:
                raise ApiError(404, f"Invalid rev id: parent commit {parent_given}",
                               "RevisionNotFound")
            return full
        if full != head:
            raise ApiError(412, "A commit has happened since. Please refresh and try "
                                f"again. (parent commit {parent_given} is not the head "
                                f"{head} of {ref})")
        return head

    def _apply_operations(self, tree: dict, operations: list[tuple[str, dict]]) -> None:
        for key, value in operations:
            path = value["path"]
            if key == "file":
                data = value["data"]
                tree[path] = tree_entry(self.blobs.put(data), len(data), data, False)
            elif key == "lfsFile":
                tree[path] = self._lfs_entry(path, value["oid"], value.get("size"))
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

    def _lfs_entry(self, path: str, oid: str, size: int | None) -> dict:
        """The tree entry of an uploaded LFS object (400 when missing or of another size)."""
        blob = self.blobs.path(oid)
        if not blob.exists():
            raise ApiError(400, f"LFS object {oid} for {path!r} was not uploaded "
                                "(preupload and the LFS batch come first)")
        stored = blob.stat().st_size
        if size not in (None, stored):
            raise ApiError(400, f"size mismatch for {path!r}: stored LFS object has "
                                f"{stored} bytes, the commit says {size}")
        return tree_entry(oid, stored, None, True)

    def _check_tree(self, tree: dict, parent_tree: dict) -> None:
        """No path both a file and a folder; a changed README.md has valid YAML metadata."""
        paths = sorted(tree)
        for a, b in zip(paths, paths[1:], strict=False):
            if b.startswith(a + "/"):
                raise ApiError(400, f"{a!r} would be both a file and a folder")
        if "README.md" in tree and tree["README.md"] != parent_tree.get("README.md"):
            try:
                self.meta.card(tree["README.md"]["sha256"])  # parsed before the lock, mostly
            except cards.CardError as e:
                raise ApiError(400, f"Invalid metadata in README.md: {e}") from e

    def _move_branch(self, repo: dict, branch: str, sha: str) -> None:
        repo["branches"][branch] = sha
        if branch == "main":
            repo["lastModified"] = self.commit(repo, sha)["date"]

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

    def create_discussion(self, repo: dict, title: str, description: str, user: str,
                          pull_request: bool) -> dict:
        """A discussion, or a draft PR with no commit yet (its ref at main's head)."""
        with self.lock:
            head = repo["branches"]["main"] if pull_request else None
            d = add_discussion(repo, title, description, user, is_pr=pull_request,
                               base="main", head=head, base_commit=head,
                               status="draft" if pull_request else "open")
            self.save_repo(repo)
            return d

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
            self._move_branch(repo, branch, sha)
            if comment:
                d["events"].append(new_event("comment", user, raw=comment))
            d["events"].append(new_event("status-change", user, status="merged"))
            d["status"] = "merged"
            d["mergeCommitId"] = sha
            self.save_repo(repo)
            return sha

    def _merge_commit(self, repo: dict, d: dict, target: str, branch: str, user: str) -> str:
        ours_history = {c["id"] for c in self.ancestors(repo, target)}
        base = next(c for c in self.ancestors(repo, d["head"]) if c["id"] in ours_history)
        merged, conflicts = three_way_merge(base["tree"], self.commit(repo, target)["tree"],
                                            self.commit(repo, d["head"])["tree"])
        if conflicts:
            raise ApiError(409, f"Pull request #{d['num']} conflicts with {branch} in: "
                                + ", ".join(conflicts))
        return self._write_commit(repo, [target, d["head"]], merged,
                                  f"Merge pull request #{d['num']}: {d['title']}", "", user)

