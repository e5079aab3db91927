"""Which stored blobs a user may name in a commit (an lfsFile by its sha256).

The blob store is shared by every repo, so naming a sha256 must not be a way to "copy" a file
out of a repo one cannot read. A user may name a blob that is in the history of the repo they
commit to, when they may download its files, or one whose bytes they uploaded themselves
(the LFS batch asks them for the bytes otherwise, even when the hub has them). Uploads are
remembered while the hub serves: after a restart an object is uploaded again.

Called under the store's lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class BlobAccess:
    """Uploads per user, and the sha256s of every commit of each repo (built when first asked,
    kept up to date by `add_tree`)."""

    def __init__(self) -> None:
        self._uploads: dict[str, set[str]] = {}
        self._history: dict[str, set[str]] = {}  # repo _id -> sha256s of all its commits

    def uploaded(self, user: str, sha256: str) -> None:
        """`user` sent the bytes of this blob."""
        self._uploads.setdefault(user, set()).add(sha256)

    def add_tree(self, repo: dict, tree: dict) -> None:
        """A new commit of `repo` holds these files."""
        known = self._history.get(repo["_id"])
        if known is not None:
            known.update(e["sha256"] for e in tree.values())

    def forget(self, repo: dict) -> None:
        """The repo was deleted."""
        self._history.pop(repo["_id"], None)

    def may_use(self, user: str, sha256: str, repo: dict, can_download: bool,
                trees: Callable[[], Iterable[dict]]) -> bool:
        """Whether `user` may put this blob in a commit of `repo` (`trees`: every commit's
        tree of the repo, read when its history is not known yet)."""
        if sha256 in self._uploads.get(user, ()):
            return True
        if not can_download:
            return False
        if repo["_id"] not in self._history:
            self._history[repo["_id"]] = {e["sha256"] for t in trees() for e in t.values()}
        return sha256 in self._history[repo["_id"]]
