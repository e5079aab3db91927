"""The only module that talks to the Hub (huggingface_hub), wherever HF_ENDPOINT points.

The client library retries 429 and 5xx itself; here its errors become the bot's errors with
messages a user can act on. The token comes from the environment (HF_TOKEN) through the
library and is never logged.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from bot.errors import HubError, InputNotFoundError, UsageError

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
                                      repo_type=repo_type))
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
