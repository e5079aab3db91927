"""How every Hub call is made: connect and read timeouts, retries with backoff and rate limits,
and the library's errors as the bot's (bot/hub.py makes the calls).

A 408, 429 or 5xx, a timeout or a dropped connection is retried (`with_retries`), waiting for
the Hub's RateLimit reset or Retry-After, else hub.retry_wait_seconds x 1, 2, 4...; what still
fails is a TransientHubError (try again later), never a decision about a repo. `configure`
takes the [hub] settings for the process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, parse_ratelimit_headers

from bot.errors import GoneError, HubError, TransientHubError

T = TypeVar("T")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
CONFLICT_STATUS = (409, 412)  # another writer committed first: read the head again, retry
MAX_ATTEMPTS = 5
MAX_WAIT_SECONDS = 300.0  # the longest wait for a rate limit's reset before the next try


@dataclass(frozen=True)
class Limits:
    """How long a request may take, where downloads go and how large a small file may be
    (the [hub] settings; `configure` sets them for the process)."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    cache_dir: str | None = None
    max_file_bytes: int = 64 * 1024**2
    attempts: int = MAX_ATTEMPTS  # calls in all, for a call that fails transiently
    retry_wait: float = 1.0  # seconds before the second call, doubled for each next one


_limits = Limits()


def limits() -> Limits:
    """The limits in force (the defaults until `configure`)."""
    return _limits


def configure(settings) -> None:
    """Use the [hub] settings (bot.config.HubSettings) for every Hub call from now on."""
    global _limits
    _limits = Limits(settings.connect_timeout, settings.read_timeout, settings.cache_dir,
                     int(settings.max_file_mb * 1024**2), settings.retries + 1,
                     settings.retry_wait_seconds)
    constants.HF_HUB_ETAG_TIMEOUT = constants.HF_HUB_DOWNLOAD_TIMEOUT = \
        int(max(1, settings.read_timeout))


def cache_dir() -> Path:
    """Where downloads go: hub.cache_dir, else the library's cache (HF_HUB_CACHE)."""
    return Path(_limits.cache_dir or constants.HF_HUB_CACHE).expanduser()


def _timeouts(request: httpx2.Request) -> None:
    """httpx request hook: a request sent without a timeout (the library's API calls pass
    None, which means none) gets the configured connect and read timeouts."""
    timeout = request.extensions.get("timeout")
    if isinstance(timeout, dict):
        default = {"connect": _limits.connect_timeout, "read": _limits.read_timeout,
                   "write": _limits.read_timeout, "pool": _limits.connect_timeout}
        request.extensions["timeout"] = {key: default.get(key) if value is None else value
                                         for key, value in timeout.items()}


def session_with_timeouts() -> None:
    """Put `_timeouts` on the library's shared HTTP client (made again after
    set_client_factory, so checked at each call; a list lookup)."""
    hooks = get_session().event_hooks["request"]
    if _timeouts not in hooks:
        hooks.append(_timeouts)


def with_retries(call: Callable[[], T], what: str, attempts: int | None = None, *,
                 retry: tuple[int, ...] = RETRY_STATUS,
                 passthrough: tuple[type[Exception], ...] = (EntryNotFoundError,),
                 idempotent: bool = True) -> T:
    """Run `call`; on a transient failure (a status in `retry`, a timeout, a dropped
    connection) wait and try again, up to `attempts` calls in all.

    Args:
        call: the request (or a read-then-commit that may conflict).
        what: what is being done, for the error message ("listing ...", "org/name").
        attempts: calls in all before giving up (default: hub.retries + 1, from `configure`).
        retry: the statuses worth another try: 408/429/5xx by default (the RateLimit reset or
            Retry-After, else 1, 2, 4... s); add CONFLICT_STATUS for a commit on a parent (a
            short random wait).
        passthrough: errors raised as they are (a missing file, for `read_text` to answer None).
        idempotent: False for a call that may have taken effect although it failed (a commit
            that opens a pull request, after a 5xx, a timeout or a dropped connection): only a
            429, which refuses the call, is tried again.

    Returns:
        What `call` returns. A failure still transient after the last attempt is a
        TransientHubError; every other huggingface_hub error becomes the bot's (`_bot_error`).
    """
    session_with_timeouts()
    attempts = attempts or _limits.attempts
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except passthrough:
            raise
        except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.TransportError) as e:
            status = _status(e)
            transient = status in retry if status is not None else is_transient(e)
            again = transient and (idempotent or status == 429)
            if again and attempt < attempts:
                time.sleep(_wait(e, status, attempt))
                continue
            raise _bot_error(what, e, transient) from None
    raise AssertionError("unreachable")


def is_transient(e: BaseException) -> bool:
    """Whether an error of the library or of httpx is the Hub failing for a while (408, 429,
    5xx, a timeout, a dropped connection), not an answer about the request."""
    if isinstance(e, OfflineModeIsEnabled):
        return False
    if isinstance(e, httpx2.TransportError):
        return not isinstance(e, httpx2.UnsupportedProtocol)
    if isinstance(e, HfHubHTTPError):
        return _status(e) in RETRY_STATUS
    if isinstance(e, LocalEntryNotFoundError):  # the Hub could not be reached, nothing cached
        return not constants.HF_HUB_OFFLINE and (e.__cause__ is None
                                                 or is_transient(e.__cause__))
    return False


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
    return response.status_code if response is not None else None


def _wait(e: BaseException, status: int | None, attempt: int) -> float:
    """Seconds before the next attempt: jitter after a conflict (writers spread), else the
    Hub's RateLimit reset or Retry-After, else exponential backoff; at most MAX_WAIT_SECONDS."""
    if status in CONFLICT_STATUS:
        return random.uniform(0.05, 0.15) * attempt
    response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
    wait = None
    if response is not None:
        limit = parse_ratelimit_headers(response.headers)
        if limit is not None and limit.remaining == 0:
            wait = float(limit.reset_in_seconds)
        else:
            try:
                wait = max(0.0, float(response.headers.get("Retry-After")))
            except (TypeError, ValueError):
                wait = None
    return min(MAX_WAIT_SECONDS, backoff_seconds(attempt) if wait is None else wait)


def attempts() -> int:
    """Calls in all for a call that fails transiently (hub.retries + 1)."""
    return _limits.attempts


def backoff_seconds(attempt: int) -> float:
    """The wait after failed attempt number `attempt`: hub.retry_wait_seconds x 1, 2, 4...,
    jittered by 20%."""
    return _limits.retry_wait * 2.0 ** (attempt - 1) * random.uniform(0.8, 1.2)


def _bot_error(what: str, e: Exception, transient: bool = False) -> Exception:
    """The bot's error, with what to do about it, for an error of huggingface_hub or httpx."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if transient:
        cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ else e
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        status = _status(cause)
        answer = f"the Hub answered {status} ({detail})" if status else \
            f"cannot reach the Hub: {type(cause).__name__} ({detail})"
        return TransientHubError(f"{what}: {answer}; will try again later")
    if isinstance(e, GatedRepoError):
        return HubError(f"{what}: gated, and this token has no access (request access on its "
                        "page, or set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return GoneError(f"{what}: no such revision on the Hub: {first}")
    if isinstance(e, RepositoryNotFoundError):
        return GoneError(f"{what}: not found on the Hub (or private, and HF_TOKEN has "
                         f"no access): {first}")
    if isinstance(e, LocalEntryNotFoundError):
        return HubError(f"{what}: cannot reach the Hub and nothing is cached ({e})")
    status = _status(e)
    if status in (401, 403):
        return HubError(f"{what}: the Hub answered {status} (check that HF_TOKEN is set and "
                        f"may do this): {first}")
    if status == 404:
        return GoneError(f"{what}: not found on the Hub ({first})")
    return HubError(f"{what}: the Hub answered {status or type(e).__name__}: {first}")
