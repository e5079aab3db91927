"""The only module that talks to the Hub (huggingface_hub), wherever HF_ENDPOINT points.

HF_ENDPOINT is read at each call (the library reads it once, at import), so tests and the demo
can point the bot at the local hub; `client_settings` is the one place that changes the
library's settings for a while (endpoint, token, offline, Xet) and restores them. Hub references
(model or dataset ids) become local snapshots here (`resolve_model`, `download_dataset`), so
the stages after it take local paths only. Calls are retried on 429, 5xx, timeouts and dropped
connections with exponential backoff, honouring the Hub's RateLimit and Retry-After headers;
what still fails is a TransientHubError (try again later), never a decision about a repo. Every
error the library raises becomes one of the bot's, with a message a user can act on, in one
place (`with_retries` and `_bot_error`). Every request has connect and read timeouts
(`configure`, from the [hub] settings). Model downloads take only the files a merge needs, small
files up to a size cap, into the cache named in settings; `evict` removes a fine-tune from it.
The token comes from the environment (HF_TOKEN) through the library and is never logged.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
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

from bot.errors import GoneError, HubError, TransientHubError, UsageError
from bot.merge.compat import PICKLE_PATTERNS

T = TypeVar("T")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
CONFLICT_STATUS = (409, 412)  # another writer committed first: read the head again, retry
MAX_ATTEMPTS = 5
MAX_WAIT_SECONDS = 300.0  # the longest wait for a rate limit's reset before the next try
log = logging.getLogger("safeguard")

# owner/name in ASCII letters, digits, "_", "." and "-", each part starting with a letter or digit
# and ending with a letter, digit or "_"; no "--" or ".." (the Hub's own rules, stricter than the
# library's validate_repo_id in requiring the owner)
REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}\w)?/[A-Za-z0-9](?:[\w.-]{0,94}\w)?", re.ASCII)
# What a merge needs from a model repo: weights in safetensors and the small files beside them.
# Code (*.py) is never downloaded.
WEIGHT_FILES = ["*.safetensors"]
SMALL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]  # up to Limits.max_file
MODEL_FILES = WEIGHT_FILES + SMALL_FILES
DATASET_FILES = ["*.jsonl", "*.csv", "*.json", "*.parquet"]


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


def _session_with_timeouts() -> None:
    """Put `_timeouts` on the library's shared HTTP client (made again after
    set_client_factory, so checked at each call; a list lookup)."""
    hooks = get_session().event_hooks["request"]
    if _timeouts not in hooks:
        hooks.append(_timeouts)


def is_repo_id(text: str) -> bool:
    """Whether `text` is a Hub model or dataset id, owner/name (REPO_ID)."""
    return bool(REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text \
        and not text.endswith(".git")


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); 'org/name' -> ('org/name', None)."""
    repo_id, _, revision = ref.partition("@")
    if not is_repo_id(repo_id) or (_ and not revision):
        raise UsageError(
            f"{ref!r} is neither a local directory nor a Hub repo id like org/name[@revision]")
    return repo_id, revision or None


def endpoint() -> str:
    """The Hub's URL: HF_ENDPOINT now, else the library's default."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def api() -> HfApi:
    """A client for the current endpoint; the token comes from HF_TOKEN (or the login cache)."""
    _session_with_timeouts()
    return HfApi(endpoint=endpoint())


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
    _session_with_timeouts()
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


@contextmanager
def client_settings(*, endpoint: str | None = None, token: str | None = None,
                    offline: bool | None = None, xet: bool | None = None) -> Iterator[None]:
    """huggingface_hub (and datasets) set up this way for the duration, then restored.

    The library reads HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import, into constants;
    each setting given is written to those constants and to the environment (for what reads
    it later). None leaves a setting as it is.

    Args:
        endpoint: the Hub's URL (HF_ENDPOINT).
        token: the token (HF_TOKEN).
        offline: True: no Hub or dataset downloads in this process and its children (the
            sweep runs on local snapshots; datasets, which lm-eval imports, is switched off
            too). False: this process's Hub client may reach the Hub even where
            HF_HUB_OFFLINE=1 is set; the environment keeps it, for children.
        xet: False: plain HTTP uploads (the local hub has no Xet storage).
    """
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": token,
           "HF_HUB_DISABLE_XET": None if xet is None else ("0" if xet else "1")}
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env = {key: value for key, value in env.items() if value is not None}
    datasets_config = sys.modules.get("datasets.config")
    values = {(constants, "HF_HUB_OFFLINE"): offline, (constants, "HF_HUB_DISABLE_XET"):
              None if xet is None else not xet}
    if datasets_config is not None and offline:
        values[datasets_config, "HF_HUB_OFFLINE"] = offline
        values[datasets_config, "HF_DATASETS_OFFLINE"] = offline
    values = {where: value for where, value in values.items() if value is not None}
    saved_env = {key: os.environ.get(key) for key in env}
    saved = {(module, name): getattr(module, name) for module, name in values}
    os.environ.update(env)
    for (module, name), value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        imported = sys.modules.get("datasets.config")
        if offline and datasets_config is None and imported is not None:  # lm-eval's
            imported.HF_HUB_OFFLINE = imported.HF_DATASETS_OFFLINE = constants.HF_HUB_OFFLINE


def hide_progress_bars() -> None:
    """No download progress bars from the library, from now on (quiet commands, --json)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def offline() -> contextlib.AbstractContextManager[None]:
    """No Hub or dataset downloads for the duration (the sweep: local snapshots only)."""
    return client_settings(offline=True)


def list_finetunes(base: str, relation: str, limit: int) -> list:
    """The newest `limit` models declaring `base` as their base with this relation
    (finetune, adapter, merge, quantized), newest first; the client follows pagination."""
    return with_retries(lambda: list(api().list_models(
        filter=f"base_model:{relation}:{base}", sort="last_modified", limit=limit,
        full=True, cardData=True)), f"listing {relation}s of {base}")


def model_info(repo: str, revision: str | None = None):
    """A model's info with its files' sizes."""
    return with_retries(lambda: api().model_info(repo, revision=revision, files_metadata=True),
                        f"{repo}")


def read_json(repo: str, filename: str, revision: str | None = None) -> dict | None:
    """A small JSON file of a model repo (config.json, adapter_config.json), None if absent.
    Not JSON, nested past the parser's depth, or over the size cap: a HubError."""
    text = read_text(repo, filename, revision)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else "not valid JSON"
        raise HubError(f"{repo}/{filename}: {why}") from None
    return data if isinstance(data, dict) else None


def resolve_model(ref: str, allow_pickle: bool = False, quiet: bool = False) -> Path:
    """A local model directory as is, or a Hub repo id[@revision] downloaded: the local path
    merge/ and evaluate/ take."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"{ref} is a file; give the model's directory")
    return download_model(ref, allow_pickle=allow_pickle, quiet=quiet)


def download_model(ref: str, allow_pickle: bool = False, quiet: bool = False) -> Path:
    """Download the files a merge needs from a Hub model repo; returns the local snapshot.

    The files are chosen from the revision's listing: weights (safetensors; pickle only when
    allowed) and the small files beside them up to the size cap (larger ones are left out,
    logged). Code is never downloaded."""
    repo_id, revision = parse_model_ref(ref)
    info = model_info(repo_id, revision)
    weights = WEIGHT_FILES + (list(PICKLE_PATTERNS) if allow_pickle else [])
    names, too_big = [], []
    for sibling in info.siblings or []:
        name, size = sibling.rfilename, sibling.size or 0
        if _matches(name, weights):
            names.append(name)
        elif _matches(name, SMALL_FILES):
            (too_big if size > _limits.max_file_bytes else names).append(name)
    for name in too_big:
        log.warning(f"{repo_id}: {name} is larger than hub.max_file_mb, not downloaded")
    return _snapshot(repo_id, info.sha or revision, [glob.escape(n) for n in names], "model",
                     quiet)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def download_dataset(ref: str, quiet: bool = False) -> Path:
    """Download a Hub dataset repo's data files (JSONL, CSV, JSON, Parquet); no code."""
    repo_id, revision = parse_model_ref(ref)
    return _snapshot(repo_id, revision, DATASET_FILES, "dataset", quiet)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], repo_type: str,
              quiet: bool) -> Path:
    """snapshot_download (which retries by itself) with its errors turned into the bot's."""
    if quiet:
        hide_progress_bars()
    return Path(with_retries(lambda: snapshot_download(
        repo_id, revision=revision, allow_patterns=patterns, repo_type=repo_type,
        endpoint=endpoint(), cache_dir=_limits.cache_dir), repo_id, passthrough=()))


def cached(repo_id: str, revision: str, filename: str) -> bool:
    """Whether the cache holds `filename` of `repo_id` at that commit."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=_limits.cache_dir,
                                   revision=revision)
    return isinstance(found, str)


def evict(repo_id: str, revision: str) -> int:
    """Remove one revision of a model from the cache (its blobs that no other cached revision
    uses); the bytes freed. A cache that does not exist frees nothing."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scan = scan_cache_dir(_limits.cache_dir)
    except CacheNotFound:
        return 0
    hashes = [r.commit_hash for repo in scan.repos
              if repo.repo_id == repo_id and repo.repo_type == "model"
              for r in repo.revisions if r.commit_hash == revision]
    if not hashes:
        return 0
    strategy = scan.delete_revisions(*hashes)
    strategy.execute()
    return strategy.expected_freed_size



# --- writing: pull requests, variant repos, the results feed -------------------------------

def whoami() -> str:
    """The name of the account HF_TOKEN belongs to (asked once per endpoint and token)."""
    return _whoami(endpoint(), os.environ.get("HF_TOKEN"))


@functools.cache
def _whoami(url: str, token: str | None) -> str:
    return with_retries(lambda: HfApi(endpoint=url, token=token).whoami()["name"], "whoami")


def _operations(files: dict[str, Path | bytes]) -> list:
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
            for name, content in sorted(files.items())]


def open_pull_request(repo: str, files: dict[str, Path | bytes], title: str, description: str,
                      parent_commit: str | None = None,
                      delete: list[str] = ()) -> tuple[int, str]:
    """One commit on a new pull request of `repo` (branched from `parent_commit` when given)
    that adds `files` and deletes the paths in `delete`; returns (number, url).

    Not idempotent: after a 5xx, a timeout or a dropped connection it may have landed, or may
    still land, so it is tried again only after a 429; the caller looks for it instead."""
    from huggingface_hub import CommitOperationDelete

    operations = _operations(files) + [CommitOperationDelete(path_in_repo=p) for p in delete]
    info = with_retries(lambda: api().create_commit(
        repo, operations, commit_message=title, commit_description=description,
        create_pr=True, parent_commit=parent_commit), f"opening a pull request on {repo}",
        idempotent=False)
    return int(info.pr_num), str(info.pr_url)


def pull_requests_by(repo: str, author: str) -> list[tuple[int, str, str]]:
    """(number, title, status) of every pull request `author` has on `repo`, open, closed or
    merged."""
    return with_retries(lambda: [
        (d.num, d.title, d.status) for d in api().get_repo_discussions(
            repo, author=author, discussion_type="pull_request")],
        f"listing pull requests of {repo}")


def publish_repo(repo: str, files: dict[str, Path | bytes], message: str,
                 private: bool = False) -> str:
    """Create `repo` (if new) and commit `files` to it in one commit; the commit's url."""
    def call() -> str:
        client = api()
        client.create_repo(repo, exist_ok=True, private=private)
        return str(client.create_commit(repo, _operations(files), commit_message=message)
                   .commit_url)

    return with_retries(call, f"publishing {repo}")


def append_lines(repo: str, path: str, lines: list[str], message: str,
                 repo_type: str = "dataset", attempts: int = 8,
                 key: Callable[[str], str] | None = None) -> str | None:
    """Append `lines` to a text file of a Hub repo (created if missing) without losing anyone's:
    read the file at the head, commit with parent_commit = head, and on a conflict (409/412,
    another writer got there first) read again and retry. With `key`, a line whose key the file
    already has is not appended again (a retried run). Returns the new commit's sha (None:
    nothing new).
    """
    from huggingface_hub import CommitOperationAdd

    client = api()
    with_retries(lambda: client.create_repo(repo, repo_type=repo_type, exist_ok=True),
                 f"creating {repo}")

    def append_at_head() -> str | None:
        head = with_retries(lambda: client.repo_info(repo, repo_type=repo_type).sha,
                            f"reading {repo}")
        current = read_text(repo, path, head, repo_type) or ""
        present = {key(x) for x in current.splitlines() if x.strip()} if key else set()
        new = [x for x in lines if key is None or key(x) not in present]
        if not new:
            return None
        text = current + "".join(line.rstrip("\n") + "\n" for line in new)
        return client.create_commit(
            repo, [CommitOperationAdd(path_in_repo=path, path_or_fileobj=text.encode())],
            commit_message=message, repo_type=repo_type, parent_commit=head).oid

    return with_retries(append_at_head, f"appending to {repo}/{path}", attempts,
                        retry=RETRY_STATUS + CONFLICT_STATUS)


def read_text(repo: str, filename: str, revision: str | None = None,
              repo_type: str = "model") -> str | None:
    """A small text file of a repo (README.md, a JSON config, the feed), None if absent."""
    try:
        path = Path(with_retries(lambda: hf_hub_download(
            repo, filename, revision=revision, repo_type=repo_type, endpoint=endpoint(),
            cache_dir=_limits.cache_dir), f"{repo}/{filename}"))
    except EntryNotFoundError:
        return None
    if path.stat().st_size > _limits.max_file_bytes:
        raise HubError(f"{repo}/{filename}: {path.stat().st_size / 1e6:.0f} MB, larger than "
                       "hub.max_file_mb")
    return path.read_text(encoding="utf-8", errors="replace")
