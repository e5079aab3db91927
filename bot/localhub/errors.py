"""The local hub's own errors: it imports nothing of the bot, so it has its own hierarchy."""

from __future__ import annotations


class LocalHubError(Exception):
    """The local hub cannot do what was asked: serve a directory, find a repo."""


class LocalHubUsageError(LocalHubError, ValueError):
    """A bad argument to the local hub: a user or org name, a token, a setting."""


class ApiError(LocalHubError):
    """A request the hub refuses: an HTTP status, a message and the Hub's X-Error-Code.

    `body` adds fields to the JSON answer, `headers` adds headers to it.
    """

    def __init__(self, status: int, message: str, code: str | None = None,
                 body: dict | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body or {}
        self.headers = headers or {}


def not_found(repo_id: str) -> ApiError:
    """The Hub's answer for a repo that does not exist or that the caller may not see."""
    return ApiError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def entry_not_found(path: str, rev: str, sha: str) -> ApiError:
    """EntryNotFound, carrying the commit the client caches the absence under."""
    return ApiError(404, f"Entry not found: {path} at {rev}", "EntryNotFound",
                    headers={"X-Repo-Commit": sha})
