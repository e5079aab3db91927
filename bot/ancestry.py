"""Declared ancestry: the repos that stand for a watched base, so that a fine-tune of one of
them is a candidate of the watched base (merged with the base itself, in full precision).

A copy of a repo is a quantization of it in safetensors (the Hub's `base_model:quantized:`
tag, e.g. a bitsandbytes 4-bit upload that people fine-tune from) or a repo that
`watch.aliases` names (a base uploaded again under another name). Card text is never read:
only the Hub's derived tags and the settings. A chain is followed at most
`watch.ancestry_depth` links from a fine-tune up to its watched base, and every listing and
model_info is asked once per Ancestry (one per discovery cycle).
"""

from __future__ import annotations

from bot import hub
from bot.config import WatchSettings
from bot.errors import SafeguardError

QUANTIZED = "base_model:quantized:"


class Ancestry:
    """Copies of watched bases, found once per cycle."""

    def __init__(self, watch: WatchSettings) -> None:
        self.watch = watch
        self._copies: dict[str, list[str]] = {}  # repo -> its copies
        self._parents: dict[str, str | None] = {}  # repo -> what its tags say it quantizes

    def copies(self, base: str) -> list[str]:
        """The copies of `base` whose fine-tunes count as its own, nearest first: at most
        ancestry_depth - 1 links from it. A listing that fails raises (SafeguardError)."""
        found: list[str] = []
        level = [base]
        for _ in range(self.watch.ancestry_depth - 1):
            level = list(dict.fromkeys(c for node in level for c in self._copies_of(node)
                                       if c != base and c not in found))
            found += level
        return found

    def _copies_of(self, repo: str) -> list[str]:
        if repo not in self._copies:
            named = [a for a, target in self.watch.aliases.items() if target == repo]
            listed = [m.id for m in hub.list_copies(repo, self.watch.copies_per_base)] \
                if self.watch.copies_per_base else []
            self._copies[repo] = list(dict.fromkeys(named + listed))
        return self._copies[repo]

    def resolve(self, declared: str) -> tuple[str, str | None]:
        """(base, via) for a fine-tune whose card declares `declared` as its base: the watched
        base that `declared` is (via None) or copies within the depth (via `declared`); else
        `declared` itself, unwatched."""
        if declared in self.watch.bases:
            return declared, None
        node: str | None = declared
        for _ in range(self.watch.ancestry_depth - 1):
            node = self._parent(node)
            if node is None:
                break
            if node in self.watch.bases:
                return node, declared
        return declared, None

    def _parent(self, repo: str) -> str | None:
        """What `repo` is a copy of: its alias's target, else the repo its Hub tags say it
        quantizes, else None (a repo that is gone or private has no parent)."""
        if repo in self.watch.aliases:
            return self.watch.aliases[repo]
        if repo not in self._parents:
            try:
                tags = hub.model_info(repo).tags or []
            except SafeguardError as e:
                if e.transient:
                    raise
                tags = []
            self._parents[repo] = next(
                (t.removeprefix(QUANTIZED) for t in tags if t.startswith(QUANTIZED)), None)
        return self._parents[repo]
