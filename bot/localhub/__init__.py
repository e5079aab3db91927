"""A Hub-API-compatible server on loopback, storing repos on disk: the ground for tests and demo.

The real `huggingface_hub.HfApi` talks to it over HTTP (`HfApi(endpoint=hub.url)` or
`HF_ENDPOINT=hub.url`), so the bot's code path is the one it takes against huggingface.co.
Uploads need `HF_HUB_DISABLE_XET=1` (Xet is not supported; LFS is). What is and is not
supported: docs/localhub.md. It imports nothing of the bot: its errors are its own
(`LocalHubError`, and `LocalHubUsageError` for bad arguments).
`add_fault(Fault(...))` makes it misbehave on purpose (errors, 429s, stalls, drops).

    with LocalHub("/tmp/hub") as hub:          # or hub = LocalHub(dir); hub.start(port=0)
        hub.add_user("alice", "hf_alice_token", orgs=["safeguard"])
        api = HfApi(endpoint=hub.url, token="hf_alice_token")
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from bot.localhub.api import Api
from bot.localhub.errors import LocalHubError, LocalHubUsageError
from bot.localhub.faults import Fault
from bot.localhub.limits import TIMEOUT
from bot.localhub.server import Server
from bot.localhub.store import Store

__all__ = ["Fault", "LocalHub", "LocalHubError", "LocalHubUsageError"]


class LocalHub:
    """A local hub over one directory; `start` serves it from a background thread.

    Args:
        directory: where users, repos and blobs live (created if missing; reused across runs).
        page_size: the most items one page of a listing holds (models, datasets, trees,
            commits; discussions hold at most 50, like the Hub). Listings longer than a page
            carry a `Link: <...>; rel="next"` header. Can be changed while serving.
        timeout: seconds a client may stay silent (before or within a request, or idle between
            requests) before its connection is closed; taken by the next `start`.
    """

    def __init__(self, directory: str | os.PathLike, *, page_size: int = 1000,
                 timeout: float = TIMEOUT):
        if page_size < 1:
            raise LocalHubUsageError("page_size must be at least 1")
        if not timeout > 0:
            raise LocalHubUsageError("timeout must be a positive number of seconds")
        self.timeout = timeout
        self.directory = Path(directory)
        self.store = Store(self.directory)
        self._api = Api(self.store, page_size)
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._lock_file: IO[bytes] | None = None
        self._faults: list[Fault] = []  # shared with the server, which reads it per request
        self._faults_lock = threading.Lock()

    # ---- serving

    @property
    def page_size(self) -> int:
        """The most items per page of a listing."""
        return self._api.page_size

    @page_size.setter
    def page_size(self, value: int) -> None:
        if value < 1:
            raise LocalHubUsageError("page_size must be at least 1")
        self._api.page_size = value

    def start(self, port: int = 0, host: str = "127.0.0.1") -> LocalHub:
        """Serve in a background thread; port 0 takes a free port. Returns self."""
        if self._server is not None:
            raise LocalHubUsageError(f"the local hub is already serving at {self.url}")
        self._lock_directory()
        # what is on disk is the truth: another hub may have served this directory meanwhile
        shutil.rmtree(self.directory / "tmp", ignore_errors=True)  # uploads cut short
        self.store = Store(self.directory)
        self._api = Api(self.store, self._api.page_size)
        try:
            self._server = Server((host, port), self._api, self._faults, self.timeout)
        except OSError as e:
            self._unlock_directory()
            raise LocalHubError(f"cannot serve the local hub on {host}:{port}: {e}") from e
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"localhub:{self.port}", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        """Block until the hub stops; Ctrl-C raises KeyboardInterrupt here (the CLI's serve)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        """Stop serving and close every client connection; the data stays on disk."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping = True  # also ends the stalls of "hang" faults at once
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None
        self._unlock_directory()

    # ---- faults

    def add_fault(self, fault: Fault) -> Fault:
        """Make matching requests misbehave (see `Fault`); works while serving. Faults are
        tried in the order added, the first that fires wins. Returns the fault (its
        `matched` and `injected` count what it did)."""
        if not isinstance(fault, Fault):
            raise LocalHubUsageError(f"add_fault wants a Fault, not {fault!r}")
        with self._faults_lock:
            self._faults.append(fault)
        return fault

    @property
    def faults(self) -> list[Fault]:
        """The current faults, in the order added (a copy of the list)."""
        with self._faults_lock:
            return list(self._faults)

    def clear_faults(self) -> None:
        """Remove every fault: requests are answered normally again."""
        with self._faults_lock:
            self._faults.clear()

    def _lock_directory(self) -> None:
        """One server per directory: an exclusive lock on DIR/.lock while serving."""
        f = open(self.directory / ".lock", "a+b")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise LocalHubError(f"{self.directory} is already served by another local hub"
                                ) from None
        self._lock_file = f

    def _unlock_directory(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    @property
    def port(self) -> int:
        """The port being served (raises when not serving)."""
        if self._server is None:
            raise LocalHubUsageError("the local hub is not serving; call start() first")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint to give HfApi(endpoint=...) or HF_ENDPOINT, e.g. http://127.0.0.1:5123."""
        if self._server is None:
            raise LocalHubUsageError("the local hub is not serving; call start() first")
        host = self._server.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> LocalHub:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- users and settings (what the Hub's web UI would do)

    def add_user(self, name: str, token: str, orgs: Iterable[str] = ()) -> None:
        """Add a user with a token (write access to their namespace and to their orgs').

        Calling it again for the same user adds a token and org memberships.
        """
        self.store.add_user(name, token, orgs)

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment variables that point a subprocess's huggingface_hub at this hub."""
        out = {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        if token is not None:
            out["HF_TOKEN"] = token
        return out

    def _repo(self, repo_id: str, repo_type: str) -> dict:
        repo = self.store.repos.get((repo_type, repo_id.lower()))
        if repo is None:
            raise LocalHubError(f"no {repo_type} repo {repo_id!r} on the local hub")
        return repo

    def set_gated(self, repo_id: str, gated: str | bool = "auto", *,
                  repo_type: str = "model") -> None:
        """Gate a repo ('auto' or 'manual') or ungate it (False)."""
        if gated not in ("auto", "manual", False):
            raise LocalHubUsageError("gated must be 'auto', 'manual' or False")
        with self.store.lock:
            repo = self._repo(repo_id, repo_type)
            repo["gated"] = gated
            self.store.save_repo(repo)

    def grant_access(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Let a user download a gated repo's files."""
        with self.store.lock:
            repo = self._repo(repo_id, repo_type)
            if user not in self.store.users:
                raise LocalHubUsageError(f"no user {user!r} on the local hub")
            if user not in repo["grants"]:
                repo["grants"].append(user)
                self.store.save_repo(repo)

    def set_downloads(self, repo_id: str, downloads: int, *, repo_type: str = "model") -> None:
        """Set a repo's download count (the Hub's popularity signal, for sorting)."""
        with self.store.lock:
            repo = self._repo(repo_id, repo_type)
            repo["downloads"] = int(downloads)
            self.store.save_repo(repo)
