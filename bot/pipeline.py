"""The bot's cycle: discover -> (per candidate) checks -> sweep -> selection -> merge -> card ->
publish -> feed -> ledger.

The pipeline knows no Hub or tensor details: discovery and checks are bot/discovery.py, turning Hub
ids into local snapshots bot/hub.py, the sweep bot/evaluate/sweep.py (through bot/stages.py),
the merge bot/merge/engine.py, publishing bot/publish/, memory bot/ledger.py. Each step's time
is recorded in the result, a frozen dataclass of bot/results.py.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

from bot.config import Settings
from bot.discovery import Candidate, Discovery, Skip, candidate_for, discover
from bot.errors import SafeguardError
from bot.results import (
    AsrChange,
    CandidateOutcome,
    CycleResult,
    NotProcessed,
    Processed,
    RetryItem,
    Skipped,
)

Log = Callable[[str], None]
Stop = Callable[[], bool]


class Stopped(Exception):
    """Asked to stop (the daemon's SIGTERM) in the middle of a candidate."""


def _raise_if_stopped(stop: Stop) -> None:
    if stop():
        raise Stopped("stopped before it finished (SIGTERM)")


def open_ledger(settings: Settings, workdir: Path):
    """The ledger named in config, or ledger.sqlite in the work dir."""
    from bot.ledger import Ledger

    workdir.mkdir(parents=True, exist_ok=True)
    return Ledger(settings.ledger.url or workdir / "ledger.sqlite",
                  max_attempts=settings.ledger.max_attempts,
                  lease_seconds=settings.ledger.lease_seconds)


class Timer:
    """Seconds per named step; `announce(name)` runs as each step starts."""

    def __init__(self, announce: Log = lambda _: None) -> None:
        self.seconds: dict[str, float] = {}
        self.announce = announce

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.announce(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0)
                                       + time.perf_counter() - started, 3)


def run_once(settings: Settings, workdir: Path, discover_only: bool = False,
             log: Log = lambda _: None, stop: Stop = lambda: False) -> CycleResult:
    """One cycle: record new candidates and skips, then process every claimable candidate.

    `stop()` is asked between candidates (the daemon's SIGTERM): the cycle ends early and
    leaves the rest queued. With `discover_only`, nothing is processed and the result lists
    what is left to retry instead.
    """
    started = time.perf_counter()
    ledger = open_ledger(settings, workdir)
    try:
        found = _discover(ledger, settings)
        retry = _left_to_retry(ledger, found) if discover_only else None
        processed = () if discover_only else _process_queue(ledger, settings, workdir, log, stop)
        stopped = stop()
    finally:
        ledger.close()
    return CycleResult(found, processed, stopped, round(time.perf_counter() - started, 3), retry)


def _discover(ledger, settings: Settings) -> Discovery:
    """Discovery, with what it found recorded: candidates queued, skips with their reasons."""
    found = discover(settings, is_known=lambda repo, rev: ledger.seen(repo, rev) is not None)
    for c in found.candidates:
        ledger.enqueue(c.repo, c.revision, c.kind, c.base)
    for s in found.skips:
        ledger.skip(s.repo, s.revision, s.reason, s.kind, s.base)
    return found


def _left_to_retry(ledger, found: Discovery) -> tuple[RetryItem, ...]:
    """What a separate processor (the Actions matrix) should take besides the new candidates:
    queued entries and failed ones with attempts left."""
    new = {(c.repo, c.revision) for c in found.candidates}
    return tuple(RetryItem(e.repo, e.revision, e.kind, e.base, e.status, e.attempts)
                 for e in ledger.claimable() if (e.repo, e.revision) not in new)


def _process_queue(ledger, settings: Settings, workdir: Path, log: Log,
                   stop: Stop) -> tuple[CandidateOutcome, ...]:
    """Claim and process entries until none is left or `stop()` says so."""
    from bot.ledger import default_worker

    worker, processed = default_worker(), []
    while not stop():
        entry = ledger.claim(worker)
        if entry is None:
            break
        log(f"processing {entry.repo}@{entry.revision[:8]}")
        try:
            processed.append(_process_entry(ledger, entry, settings, workdir, log=log,
                                            stop=stop))
        except Stopped:
            log(f"released {entry.repo}@{entry.revision[:8]}: stopping")
            break
    return tuple(processed)


def process_one(ref: str, settings: Settings, workdir: Path,
                log: Log = lambda _: None) -> CandidateOutcome:
    """`process REPO[@REV]`: one candidate end to end, through the ledger (never twice)."""
    from bot.ledger import default_worker

    repo, _, revision = ref.partition("@")
    found = candidate_for(repo, revision or None, settings)
    ledger = open_ledger(settings, workdir)
    try:
        known = ledger.seen(found.repo, found.revision)
        if known is not None and known.status in ("published", "skipped", "running"):
            return NotProcessed(found.repo, found.revision, known.status,
                                f"already {known.status} at this revision: {known.reason}")
        if isinstance(found, Skip):
            ledger.skip(found.repo, found.revision, found.reason, found.kind, found.base)
            return Skipped(found)
        ledger.enqueue(found.repo, found.revision, found.kind, found.base)
        entry = ledger.claim(default_worker(), found.repo, found.revision)
        if entry is None:
            return NotProcessed(found.repo, found.revision, "unclaimable",
                                "another worker holds it, or it ran out of attempts")
        log(f"processing {found.repo}@{found.revision[:8]}")
        return _process_entry(ledger, entry, settings, workdir, found, log)
    finally:
        ledger.close()


def _process_entry(ledger, entry, settings: Settings, workdir: Path,
                   candidate: Candidate | Skip | None = None, log: Log = lambda _: None,
                   stop: Stop = lambda: False) -> CandidateOutcome:
    """Process a claimed entry; the ledger ends published, skipped or failed (retryable), or,
    when stopped mid-way, the entry is released (queued again, the attempt not counted)."""
    try:
        if candidate is None:  # claimed from the queue (discovery or a webhook)
            candidate = _judge_again(entry, settings)
        if isinstance(candidate, Skip):
            ledger.finish(entry, "skipped", candidate.reason)
            return Skipped(candidate)

        def renew_and_ask() -> bool:  # between steps and sweep points: renew the lease
            ledger.heartbeat(entry)
            return stop()

        outcome = process(candidate, settings, workdir, log, renew_and_ask)
    except Stopped as e:
        ledger.release(entry, str(e))
        raise
    except SafeguardError as e:
        ledger.fail(entry, str(e))
        with suppress(SafeguardError):  # the ledger has the failure either way
            _feed(settings, workdir, [_failure_record(entry, str(e))])
        return NotProcessed(entry.repo, entry.revision, "failed", str(e))
    ledger.finish(entry, outcome.status, outcome.reason, selection=asdict(outcome.selection),
                  links=outcome.publication.links)
    return outcome


def _judge_again(entry, settings: Settings) -> Candidate | Skip:
    """A queued entry examined as discovery would, now; a base no longer watched is a skip."""
    found = candidate_for(entry.repo, entry.revision, settings)
    if isinstance(found, Candidate) and found.base not in settings.watch.bases:
        return Skip(found.repo, found.revision, found.base, found.kind,
                    f"its base {found.base} is not watched")
    return found


def process(candidate: Candidate, settings: Settings, workdir: Path,
            log: Log = lambda _: None, stop: Stop = lambda: False) -> Processed:
    """Sweep, merge the selected lambda, publish, feed. Returns what happened and its timings.

    Each step is logged as "REPO: step NAME" before it starts (the daemon's log, and the
    kill-at-any-step test's cue); `stop()` is checked before each step and between the
    sweep's points, so a stop request releases the candidate within one evaluation."""
    from bot import hub
    from bot.evaluate.sweep import write_report
    from bot.publish import feed
    from bot.publish.publisher import publish
    from bot.stages import sweep_dirs

    def announce(name: str) -> None:
        if name != "feed":  # once published, finish: the feed and the ledger must say so
            _raise_if_stopped(stop)
        log(f"{candidate.repo}: step {name}")

    timer = Timer(announce)
    ft_ref = f"{candidate.repo}@{candidate.revision}"
    with timer.step("sweep"):
        base_dir = hub.resolve_model(candidate.base, quiet=True)
        ft_dir = hub.resolve_model(ft_ref, quiet=True)
        report = sweep_dirs(base_dir, ft_dir, _sweep_settings(candidate, settings),
                            lambda i, n, what: _raise_if_stopped(stop), (candidate.base, ft_ref))
    name = f"{candidate.repo.replace('/', '--')}@{candidate.revision[:12]}"
    report_path, plot = write_report(report, workdir / "reports" / f"{name}.json")
    merged = None
    if report.selection.publish and candidate.action in ("pull-request", "variant"):
        merged = workdir / "merged" / name
        with timer.step("merge"):
            _merge_selected(candidate, base_dir, ft_dir, report.selection.weight, merged,
                            settings)
    with timer.step("publish"):
        publication = publish(candidate, report, merged, plot, settings)
    record = feed.record(candidate.repo, candidate.revision, candidate.base,
                         publication.decision, publication.reason, report, publication.links)
    with timer.step("feed"):
        _feed(settings, workdir, [record])
    if merged is not None:
        shutil.rmtree(merged, ignore_errors=True)  # published; the report stays
    return Processed(
        candidate, publication, report.selection,
        AsrChange(report.base_point.asr, report.finetune_point.asr, record.asr_merged),
        record.retention, str(report_path),
        {**timer.seconds, **{f"sweep_{k}": v for k, v in report.timings.items()
                             if k.endswith("_seconds")}})


def _sweep_settings(candidate: Candidate, settings: Settings) -> Settings:
    """The settings with the candidate's own task file, where config names one."""
    ev = settings.evaluate
    if candidate.repo in ev.task_files:
        ev = ev.model_copy(update={"task_file": ev.task_files[candidate.repo]})
    return settings.model_copy(update={"evaluate": ev})


def _merge_selected(candidate: Candidate, base_dir: Path, ft_dir: Path, weight: float | None,
                    out: Path, settings: Settings) -> None:
    """Write the selected merge (an adapter for an adapter's pull request, where the method
    keeps the low-rank form) into `out`."""
    from bot.merge.engine import MergeRequest, merge_models
    from bot.merge.methods import method_named

    s = settings.sweep
    method = method_named(s.method)
    merge_models(MergeRequest(
        base_dir, ft_dir, out, s.method, weight, s.density if method.uses_density else None,
        s.seed, s.dtype, device=s.device,
        as_adapter=candidate.kind == "adapter" and candidate.action == "pull-request"
        and method.keeps_adapter_form, overwrite=True), quiet=True)


def _feed(settings: Settings, workdir: Path, records: list) -> None:
    """Write the records locally, then append them to the results dataset on the Hub."""
    from bot.publish import feed

    feed.write_local(records, Path(settings.publish.feed_dir or workdir / "feed"),
                     settings.publish.templates_dir)
    feed.push(records, feed.results_repo(settings.publish))


def _failure_record(entry, reason: str):
    from bot.publish import feed

    return feed.record(entry.repo, entry.revision, entry.base or "", "failed", reason)
