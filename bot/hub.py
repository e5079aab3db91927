"""The only module that talks to the Hub (huggingface_hub), wherever HF_ENDPOINT points.

HF_ENDPOINT is read at each call (the library reads it once, at import), so tests and the demo
can point the bot at the local hub; `client_settings` is the one place that changes the
library's settings for a while (endpoint, token, offline, Xet) and restores them. Hub references
(model or dataset ids) become local snapshots here (`resolve_model`, `download_dataset`), so
the stages after it take local paths only. API calls are retried on 429 and 5xx with exponential
backoff, honouring Retry-After (downloads are retried by the library itself), and every error
the library raises becomes one of the bot's, with a message a user can act on, in one place
(`with_retries` and `_bot_error`). The token comes from the environment (HF_TOKEN) through the
library and is never logged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from bot.errors import HubError, InputNotFoundError, UsageError
from bot.merge.compat import PICKLE_PATTERNS

T = TypeVar("T")
RETRY_STATUS = (429, 500, 502, 503, 504)
CONFLICT_STATUS = (409, 412)  # another writer committed first: read the head again, retry
MAX_ATTEMPTS = 5
MAX_WAIT_SECONDS = 60.0

# owner/name in ASCII letters, digits, "_", "." and "-", each part starting with a letter or digit
# and ending with a letter, digit or "_"; no "--" or ".." (the Hub's own rules, stricter than the
# library's validate_repo_id in requiring the owner)
REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}\w)?/[A-Za-z0-9](?:[\w.-]{0,94}\w)?", re.ASCII)
# What a merge needs from a model repo: weights in safetensors and the small files beside them.
# Code (*.py) is never downloaded.
MODEL_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
DATASET_FILES = ["*.jsonl", "*.csv", "*.json", "*.parquet"]


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
    return HfApi(endpoint=endpoint())


def with_retries(call: Callable[[], T], what: str, attempts: int = MAX_ATTEMPTS, *,
                 retry: tuple[int, ...] = RETRY_STATUS,
                 passthrough: tuple[type[Exception], ...] = (EntryNotFoundError,)) -> T:
    """Run `call`; on a status in `retry` wait and try again, up to `attempts` calls in all.

    Args:
        call: the request (or a read-then-commit that may conflict).
        what: what is being done, for the error message ("listing ...", "org/name").
        attempts: calls in all before giving up.
        retry: the statuses worth another try: 429/5xx by default (Retry-After, else 1, 2,
            4... s); add CONFLICT_STATUS for a commit on a parent (a short random wait).
        passthrough: errors raised as they are (a missing file, for `read_text` to answer None).

    Returns:
        What `call` returns. Every other huggingface_hub error becomes the bot's (`_bot_error`).
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except passthrough:
            raise
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in retry and attempt < attempts:
                time.sleep(_wait(e, status, attempt))
                continue
            raise _bot_error(what, e) from None
        except LocalEntryNotFoundError as e:
            raise _bot_error(what, e) from None
    raise AssertionError("unreachable")


def _wait(e: HfHubHTTPError, status: int | None, attempt: int) -> float:
    """Seconds before the next attempt: jitter after a conflict (writers spread), else the
    server's Retry-After or exponential backoff, at most MAX_WAIT_SECONDS."""
    if status in CONFLICT_STATUS:
        return random.uniform(0.05, 0.15) * attempt
    value = e.response.headers.get("Retry-After") if e.response is not None else None
    try:
        wait = max(0.0, float(value)) if value is not None else None
    except ValueError:
        wait = None
    return min(MAX_WAIT_SECONDS, 2.0 ** (attempt - 1) if wait is None else wait)


def _bot_error(what: str, e: Exception) -> Exception:
    """The bot's error, with what to do about it, for an error of huggingface_hub."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, GatedRepoError):
        return HubError(f"{what}: gated, and this token has no access (request access on its "
                        "page, or set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return InputNotFoundError(f"{what}: no such revision on the Hub: {first}")
    if isinstance(e, RepositoryNotFoundError):
        return InputNotFoundError(f"{what}: not found on the Hub (or private, and HF_TOKEN has "
                                  f"no access): {first}")
    if isinstance(e, LocalEntryNotFoundError):
        return HubError(f"{what}: cannot reach the Hub and nothing is cached ({e})")
    status = e.response.status_code if isinstance(e, HfHubHTTPError) and \
        e.response is not None else None
    if status in (401, 403):
        return HubError(f"{what}: the Hub answered {status} (check that HF_TOKEN is set and "
                        f"may do this): {first}")
    if status == 404:
        return InputNotFoundError(f"{what}: not found on the Hub ({first})")
    return HubError(f"{what}: the Hub answered {status or 'an error'}: {first}")


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
    """A small JSON file of a model repo (config.json, adapter_config.json), None if absent."""
    text = read_text(repo, filename, revision)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise HubError(f"{repo}/{filename}: not valid JSON") from None
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
    """Download the files a merge needs from a Hub model repo; returns the local snapshot."""
    repo_id, revision = parse_model_ref(ref)
    patterns = MODEL_FILES + (list(PICKLE_PATTERNS) if allow_pickle else [])
    return _snapshot(repo_id, revision, patterns, "model", quiet)


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
        endpoint=endpoint()), repo_id, attempts=1, passthrough=()))


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
    that adds `files` and deletes the paths in `delete`; returns (number, url)."""
    from huggingface_hub import CommitOperationDelete

    operations = _operations(files) + [CommitOperationDelete(path_in_repo=p) for p in delete]
    info = with_retries(lambda: api().create_commit(
        repo, operations, commit_message=title, commit_description=description,
        create_pr=True, parent_commit=parent_commit), f"opening a pull request on {repo}")
    return int(info.pr_num), str(info.pr_url)


def open_pull_requests_by(repo: str, author: str) -> list[tuple[int, str]]:
    """(number, title) of the open pull requests `author` has on `repo`."""
    return with_retries(lambda: [
        (d.num, d.title) for d in api().get_repo_discussions(
            repo, author=author, discussion_type="pull_request", discussion_status="open")],
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
        path = with_retries(lambda: hf_hub_download(
            repo, filename, revision=revision, repo_type=repo_type, endpoint=endpoint()),
            f"{repo}/{filename}")
    except EntryNotFoundError:
        return None
    return Path(path).read_text(encoding="utf-8", errors="replace")
