"""The only module that talks to the Hub (huggingface_hub), wherever HF_ENDPOINT points.

HF_ENDPOINT is read at each call (the library reads it once, at import), so tests and the demo
can point the bot at the local hub. API calls are retried on 429 and 5xx with exponential
backoff, honouring Retry-After (downloads are retried by the library itself); errors become
the bot's errors with messages a user can act on. The token comes from the environment
(HF_TOKEN) through the library and is never logged.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import time
from collections.abc import Callable
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

T = TypeVar("T")
RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_ATTEMPTS = 5
MAX_WAIT_SECONDS = 60.0

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# What a merge needs from a model repo: weights in safetensors and the small files beside them.
# Code (*.py) is never downloaded.
MODEL_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
PICKLE_FILES = ["*.bin", "*.pt", "*.pth"]
DATASET_FILES = ["*.jsonl", "*.csv", "*.json", "*.parquet"]


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); 'org/name' -> ('org/name', None)."""
    repo_id, _, revision = ref.partition("@")
    if not REPO_ID.match(repo_id) or (_ and not revision):
        raise UsageError(
            f"{ref!r} is neither a local directory nor a Hub repo id like org/name[@revision]")
    return repo_id, revision or None


def endpoint() -> str:
    """The Hub's URL: HF_ENDPOINT now, else the library's default."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def api() -> HfApi:
    """A client for the current endpoint; the token comes from HF_TOKEN (or the login cache)."""
    return HfApi(endpoint=endpoint())


def with_retries(call: Callable[[], T], what: str, attempts: int = MAX_ATTEMPTS) -> T:
    """Run `call`; on 429/5xx wait (Retry-After, else 1, 2, 4... s) and try again.

    Other errors become the bot's: 401/403 and gated repos a HubError that says to check
    HF_TOKEN, 404 an InputNotFoundError; a missing file (EntryNotFoundError) passes through.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except EntryNotFoundError:
            raise
        except GatedRepoError:
            raise HubError(f"{what}: gated, and this token has no access") from None
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise InputNotFoundError(f"{what}: not found on the Hub (or private): "
                                     f"{str(e).splitlines()[0]}") from None
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in RETRY_STATUS and attempt < attempts:
                wait = _retry_after(e)
                time.sleep(min(MAX_WAIT_SECONDS, 2.0 ** (attempt - 1) if wait is None else wait))
                continue
            raise _hub_error(what, e, status) from None
    raise AssertionError("unreachable")


def _retry_after(e: HfHubHTTPError) -> float | None:
    value = e.response.headers.get("Retry-After") if e.response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _hub_error(what: str, e: HfHubHTTPError, status: int | None) -> Exception:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if status in (401, 403):
        return HubError(f"{what}: the Hub answered {status} (check that HF_TOKEN is set and "
                        f"may do this): {first}")
    if status == 404:
        return InputNotFoundError(f"{what}: not found on the Hub ({first})")
    return HubError(f"{what}: the Hub answered {status or 'an error'}: {first}")


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


def download_model(ref: str, allow_pickle: bool = False, quiet: bool = False) -> Path:
    """Download the files a merge needs from a Hub model repo; returns the local snapshot."""
    repo_id, revision = parse_model_ref(ref)
    patterns = MODEL_FILES + (PICKLE_FILES if allow_pickle else [])
    return _snapshot(repo_id, revision, patterns, "model", quiet)


def download_dataset(ref: str, quiet: bool = False) -> Path:
    """Download a Hub dataset repo's data files (JSONL, CSV, JSON, Parquet); no code."""
    repo_id, revision = parse_model_ref(ref)
    return _snapshot(repo_id, revision, DATASET_FILES, "dataset", quiet)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], repo_type: str,
              quiet: bool) -> Path:
    """snapshot_download with the library's errors turned into the bot's."""
    try:
        if quiet:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      repo_type=repo_type, endpoint=endpoint()))
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated and this token has no access; request access on "
                       "its page or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputNotFoundError(f"{repo_id}: no such {repo_type} on the Hub (or it is private "
                                 "and HF_TOKEN has no access)") from None
    except RevisionNotFoundError:
        raise InputNotFoundError(f"{repo_id}: no revision {revision!r}") from None
    except LocalEntryNotFoundError as e:
        raise HubError(f"{repo_id}: cannot reach the Hub and nothing is cached ({e})") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "an error"
        raise HubError(f"{repo_id}: the Hub answered {status}: {str(e).splitlines()[0]}") \
            from None


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
    read the file at the head, commit with parent_commit = head, and on a conflict (412, another
    writer got there first) read again and retry. With `key`, a line whose key the file already
    has is not appended again (a retried run). Returns the new commit's sha (None: nothing new).
    """
    from huggingface_hub import CommitOperationAdd

    client = api()
    with_retries(lambda: client.create_repo(repo, repo_type=repo_type, exist_ok=True),
                 f"creating {repo}")
    for attempt in range(attempts):
        head = with_retries(lambda: client.repo_info(repo, repo_type=repo_type).sha,
                            f"reading {repo}")
        current = read_text(repo, path, head, repo_type) or ""
        if key is not None:
            present = {key(x) for x in current.splitlines() if x.strip()}
            lines = [x for x in lines if key(x) not in present]
            if not lines:
                return None
        text = current + "".join(line.rstrip("\n") + "\n" for line in lines)
        try:
            return client.create_commit(
                repo, [CommitOperationAdd(path_in_repo=path, path_or_fileobj=text.encode())],
                commit_message=message, repo_type=repo_type, parent_commit=head).oid
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (409, 412) and attempt + 1 < attempts:
                time.sleep(random.uniform(0.05, 0.15) * (attempt + 1))  # jitter: writers spread
                continue
            if status in RETRY_STATUS and attempt + 1 < attempts:
                time.sleep(2.0 ** attempt)
                continue
            raise _hub_error(f"appending to {repo}/{path}", e, status) from None
    raise HubError(f"appending to {repo}/{path}: still conflicting after {attempts} attempts")


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
