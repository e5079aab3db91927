"""The only module that talks to the Hub (huggingface_hub), wherever HF_ENDPOINT points.

HF_ENDPOINT is read at each call (the library reads it once, at import), so tests and the demo
can point the bot at the local hub; `client_settings` is the one place that changes the
library's settings for a while (endpoint, token, offline, Xet) and restores them. Hub references
(model or dataset ids) become local snapshots here (`resolve_model`, `download_dataset`), so
the stages after it take local paths only. Every call goes through bot/hub_calls.py: timeouts,
retries (429, 5xx, timeouts, dropped connections; a TransientHubError when they run out) and the
library's errors as the bot's. Model downloads take only the files a merge needs, small files up
to a size cap, into the cache named in settings; `evict` removes a fine-tune from it. The token
comes from the environment (HF_TOKEN) through the library and is never logged.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError

from bot.errors import HubError, UsageError
from bot.hub_calls import (  # noqa: F401 - configure, cache_dir: the pipeline's, through hub
    CONFLICT_STATUS,
    RETRY_STATUS,
    cache_dir,
    configure,
    limits,
    session_with_timeouts,
    with_retries,
)
from bot.merge.compat import LICENSE_FILES, PICKLE_PATTERNS

log = logging.getLogger("safeguard")

# owner/name in ASCII letters, digits, "_", "." and "-", each part starting with a letter or digit
# and ending with a letter, digit or "_"; no "--" or ".." (the Hub's own rules, stricter than the
# library's validate_repo_id in requiring the owner)
REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}\w)?/[A-Za-z0-9](?:[\w.-]{0,94}\w)?", re.ASCII)
# What a merge needs from a model repo: weights in safetensors and the small files beside them.
# Code (*.py) is never downloaded.
WEIGHT_FILES = ["*.safetensors"]
# up to Limits.max_file_bytes
SMALL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", *LICENSE_FILES]
MODEL_FILES = WEIGHT_FILES + SMALL_FILES
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
    session_with_timeouts()
    return HfApi(endpoint=endpoint())


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


def list_copies(base: str, limit: int) -> list:
    """The `limit` most downloaded quantizations of `base` in safetensors (tagged
    `base_model:quantized:<base>` and `safetensors`: a bitsandbytes or GPTQ copy that people
    fine-tune from, not a GGUF file); their ids and tags."""
    wanted = [f"base_model:quantized:{base}", "safetensors"]
    found = with_retries(lambda: list(api().list_models(
        filter=wanted, sort="downloads", limit=limit)), f"listing quantizations of {base}")
    return [m for m in found if set(wanted) <= set(m.tags or [])]


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
            (too_big if size > limits().max_file_bytes else names).append(name)
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
        endpoint=endpoint(), cache_dir=limits().cache_dir), repo_id, passthrough=()))


def cached(repo_id: str, revision: str, filename: str) -> bool:
    """Whether the cache holds `filename` of `repo_id` at that commit."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=limits().cache_dir,
                                   revision=revision)
    return isinstance(found, str)


def evict(repo_id: str, revision: str) -> int:
    """Remove one revision of a model from the cache (its blobs that no other cached revision
    uses); the bytes freed. A cache that does not exist frees nothing."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scan = scan_cache_dir(limits().cache_dir)
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
    """Create `repo` (if new) and make it hold exactly `files` (and its .gitattributes) in one
    commit: every other file it had, an older shard among them, is deleted. The commit names
    the head it replaces (parent_commit), so a concurrent change is never overwritten unseen.
    Returns the commit's url."""
    from huggingface_hub import CommitOperationDelete

    def call() -> str:
        client = api()
        client.create_repo(repo, exist_ok=True, private=private)
        head = client.model_info(repo)
        stale = [s.rfilename for s in head.siblings or []
                 if s.rfilename not in files and s.rfilename != ".gitattributes"]
        operations = _operations(files) + [CommitOperationDelete(path_in_repo=p) for p in stale]
        return str(client.create_commit(repo, operations, commit_message=message,
                                        parent_commit=head.sha).commit_url)

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
            cache_dir=limits().cache_dir), f"{repo}/{filename}"))
    except EntryNotFoundError:
        return None
    if path.stat().st_size > limits().max_file_bytes:
        raise HubError(f"{repo}/{filename}: {path.stat().st_size / 1e6:.0f} MB, larger than "
                       "hub.max_file_mb")
    return path.read_text(encoding="utf-8", errors="replace")
