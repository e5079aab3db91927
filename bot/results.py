"""What a candidate and a cycle come to: small frozen dataclasses, the pipeline's results.

Their `to_dict()` is the JSON the command line prints (`process`, `run --once`, `demo`): a
public interface, so its keys and their order stay as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bot.discovery import Candidate, Discovery, Skip
    from bot.evaluate.sweep import Selection
    from bot.publish.publisher import Publication

# what the ledger says of a candidate after `process`; "running": another worker has it now,
# "unclaimable": held elsewhere or out of attempts; "deferred": queued again to try later (the
# Hub failed for a while, the disk is short, or a stop request came first)
Status = Literal["published", "skipped", "failed", "running", "unclaimable", "deferred"]


class FieldsAsJson:
    """For a frozen dataclass whose JSON is its fields as they are."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AsrChange:
    """Attack success rates: the base's, the fine-tune's, and the selected merge's (None when
    no merge was selected)."""

    base: float
    finetune: float
    merged: float | None


@dataclass(frozen=True)
class Processed:
    """A candidate swept, and published or not (the publication says which and why)."""

    candidate: Candidate
    publication: Publication
    selection: Selection
    asr: AsrChange
    retention: float | None
    report: str  # the sweep's report file
    timings: dict[str, float]
    feed_pending: str | None = None  # its feed record, when the push to the Hub failed

    @property
    def repo(self) -> str:
        return self.candidate.repo

    @property
    def revision(self) -> str:
        return self.candidate.revision

    @property
    def reason(self) -> str:
        return self.publication.reason

    @property
    def status(self) -> Status:
        return "published" if self.publication.published else "skipped"

    def to_dict(self) -> dict:
        c, p = self.candidate, self.publication
        return {"repo": c.repo, "revision": c.revision, "base": c.base, "kind": c.kind,
                "action": c.action, "decision": p.decision, "reason": p.reason,
                "links": p.links, "selection": asdict(self.selection), "asr": asdict(self.asr),
                "retention": self.retention, "report": self.report, "timings": self.timings,
                "feed_pending": self.feed_pending is not None, "status": self.status}


@dataclass(frozen=True)
class Skipped:
    """A candidate not worth processing (judged at discovery, or again when claimed)."""

    skip: Skip

    @property
    def repo(self) -> str:
        return self.skip.repo

    @property
    def revision(self) -> str:
        return self.skip.revision

    @property
    def reason(self) -> str:
        return self.skip.reason

    @property
    def status(self) -> Status:
        return "skipped"

    def to_dict(self) -> dict:
        return {**self.skip.to_dict(), "status": self.status}


@dataclass(frozen=True)
class NotProcessed(FieldsAsJson):
    """A candidate that ended without a sweep: it failed, was done before, or another worker
    holds it."""

    repo: str
    revision: str
    status: Status
    reason: str


CandidateOutcome = Processed | Skipped | NotProcessed


@dataclass(frozen=True)
class RetryItem(FieldsAsJson):
    """A ledger entry left to process (queued, or failed with attempts left): what a separate
    processor (the Actions matrix) takes after `run --once --discover-only`."""

    repo: str
    revision: str
    kind: str
    base: str | None
    status: str
    attempts: int


@dataclass(frozen=True)
class CycleResult:
    """One cycle: what discovery found, what was processed, whether a stop cut it short."""

    discovery: Discovery
    processed: tuple[CandidateOutcome, ...]
    stopped: bool
    seconds: float
    retry: tuple[RetryItem, ...] | None = None  # with --discover-only

    def count(self, status: Status) -> int:
        """How many processed candidates ended with `status`."""
        return sum(p.status == status for p in self.processed)

    def to_dict(self) -> dict:
        out = {**self.discovery.to_dict(), "processed": [p.to_dict() for p in self.processed],
               "stopped": self.stopped}
        if self.retry is not None:
            out["retry"] = [r.to_dict() for r in self.retry]
        return {**out, "seconds": self.seconds}


@dataclass(frozen=True)
class DemoResult:
    """The demo's cycle, where its local hub keeps its data, and how long it all took."""

    cycle: CycleResult
    hub: str
    zoo_cached: bool
    total_seconds: float

    def to_dict(self) -> dict:
        return {**self.cycle.to_dict(), "hub": self.hub, "zoo_cached": self.zoo_cached,
                "total_seconds": self.total_seconds}
