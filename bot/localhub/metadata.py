"""What the hub derives from files (card metadata, tags, safetensors counts), memoized.

Files are addressed by content and commits never change, so what is derived from them can be
computed without the store's lock and kept: the server warms these memos before it takes the
lock (listing.warm_listing, repos.warm_info, commits.prepare_commit), so a slow or hostile
card costs its own request, not everyone's. A file that cannot be read or
parsed never breaks a listing: its repo shows no card data.
"""

from __future__ import annotations

import logging

from bot.localhub import cards
from bot.localhub.blobs import Blobs

log = logging.getLogger("bot.localhub")


class Metadata:
    """Card metadata by README.md's sha256, derived data by commit; safe from any thread."""

    def __init__(self, blobs: Blobs):
        self.blobs = blobs
        self._cards: dict[str, dict | None | cards.CardError] = {}
        self._derived: dict[tuple[str, str], dict] = {}

    def card(self, sha256: str, data: bytes | None = None) -> dict | None:
        """The metadata of the README.md with this sha256 (its bytes, when not stored yet);
        raises CardError for metadata that is broken or past the limits."""
        if sha256 not in self._cards:
            head = data[:cards.CARD_HEAD] if data is not None else \
                self.blobs.read_head(sha256, cards.CARD_HEAD)
            try:
                self._cards[sha256] = cards.parse_front_matter(head.decode("utf-8", "replace"))
            except cards.CardError as e:
                self._cards[sha256] = e
        found = self._cards[sha256]
        if isinstance(found, cards.CardError):
            raise cards.CardError(str(found))
        return found

    def derived(self, kind: str, sha: str, tree: dict) -> dict:
        """Card data, tags, library... of a commit (`tree`: its files)."""
        key = (kind, sha)
        if key not in self._derived:
            try:
                self._derived[key] = cards.derive(kind, tree, self._card_of(tree),
                                                  self.blobs.read, self.blobs.read_head)
            except Exception:  # a file no rule foresaw: this repo shows nothing, others list
                log.warning("local hub: cannot derive metadata of %s commit %s", kind, sha,
                            exc_info=True)
                self._derived[key] = dict(cards.NOTHING)
        return self._derived[key]

    def _card_of(self, tree: dict) -> dict:
        readme = tree.get("README.md")
        if readme is None:
            return {}
        try:
            return self.card(readme["sha256"]) or {}
        except cards.CardError:
            return {}
