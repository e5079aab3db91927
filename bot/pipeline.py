"""The bot's cycle: discover -> (per candidate) checks -> sweep -> selection -> merge -> card ->
publish -> feed -> ledger.

The pipeline knows no Hub or tensor details: discovery and checks are bot/discovery.py, turning Hub
ids into local snapshots bot/hub.py, the sweep bot/evaluate/sweep.py (through bot/stages.py),
the merge bot/merge/engine.py, publishing bot/publish/, memory bot/ledger.py. Each step's time
is recorded in the result, a frozen dataclass of bot/results.py.

One candidate never stops the cycle: whatever it raises becomes its outcome (`_end_badly`) with
a one-line reason (the traceback goes to the log): deferred when the Hub or the disk failed for
a while, skipped when its revision is gone, failed (retried after a wait) otherwise. No entry is
left running: a stop request or an interrupt releases it. A background thread renews the claim
while a candidate runs, and its fine-tune leaves the download cache when it is done.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

from bot import hub
from bot.config import Settings
from bot.discovery import Candidate, Discovery, Skip, candidate_for, discover, one_line
from bot.errors import DiskSpaceError, GoneError, LedgerError, SafeguardError
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
    s = settings.ledger
    return Ledger(s.url or workdir / "ledger.sqlite", max_attempts=s.max_attempts,
                  lease_seconds=s.lease_seconds, retry_seconds=s.retry_seconds,
                  max_retry_seconds=s.max_retry_seconds)


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
    hub.configure(settings.hub)
    ledger = open_ledger(settings, workdir)
    try:
        found = _discover(ledger, settings)
        for error in found.errors:
            log(f"discovery: {error}")
        retry = _left_to_retry(ledger, found) if discover_only else None
        processed = ()
        if not discover_only:
            push_pending_feed(ledger, settings, workdir, log)
            processed = _process_queue(ledger, settings, workdir, log, stop)
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
    for x in found.later:
        ledger.enqueue(x.repo, x.revision, x.kind, x.base, later=x.reason)
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


def push_pending_feed(ledger, settings: Settings, workdir: Path, log: Log = lambda _: None
                      ) -> int:
    """Push the feed records that did not reach the Hub when their candidate finished, in one
    commit, redoing nothing else; how many were pushed (0 when the Hub still fails)."""
    from bot.publish import feed

    pending = ledger.feed_pending()
    if not pending:
        return 0
    records = [feed.from_json(line) for e in pending for line in e.feed_pending.splitlines()]
    try:
        _feed(settings, workdir, records)
    except (SafeguardError, OSError) as e:
        log(f"feed: {len(records)} record(s) still pending: {one_line(e)}")
        return 0
    ledger.feed_sent(pending)
    log(f"feed: pushed {len(records)} pending record(s)")
    return len(records)


def process_one(ref: str, settings: Settings, workdir: Path, log: Log = lambda _: None,
                stop: Stop = lambda: False) -> CandidateOutcome:
    """`process REPO[@REV]`: one candidate end to end, through the ledger (never twice)."""
    from bot.ledger import default_worker

    hub.configure(settings.hub)
    repo, _, revision = ref.partition("@")
    try:
        found = candidate_for(repo, revision or None, settings)
    except SafeguardError as e:
        if not e.transient:
            raise
        return NotProcessed(repo, revision, "deferred", str(e))
    ledger = open_ledger(settings, workdir)
    try:
        known = ledger.seen(found.repo, found.revision)
        if known is not None and known.status in ("published", "skipped", "running"):
            return NotProcessed(found.repo, found.revision, known.status,
                                f"already {known.status} at this revision: {known.reason}")
        if known is not None and known.retry_at is not None \
                and known.retry_at.timestamp() > time.time() \
                and known.attempts < settings.ledger.max_attempts:
            return NotProcessed(found.repo, found.revision, "deferred",
                                f"waiting until {known.retry_at.isoformat(timespec='seconds')}"
                                f" to try again: {known.reason}")
        if isinstance(found, Skip):
            ledger.skip(found.repo, found.revision, found.reason, found.kind, found.base)
            return Skipped(found)
        ledger.enqueue(found.repo, found.revision, found.kind, found.base)
        entry = ledger.claim(default_worker(), found.repo, found.revision)
        if entry is None:
            return NotProcessed(found.repo, found.revision, "unclaimable",
                                "another worker holds it, or it ran out of attempts")
        log(f"processing {found.repo}@{found.revision[:8]}")
        try:
            return _process_entry(ledger, entry, settings, workdir, found, log, stop)
        except Stopped as e:
            return NotProcessed(found.repo, found.revision, "deferred",
                                f"{e}; released to the queue")
    finally:
        ledger.close()


def release_held(settings: Settings, workdir: Path) -> int:
    """Release every claim this process holds, from any thread: a stop request whose step did
    not end within daemon.grace_seconds (a Hub call that hangs). How many were released."""
    from bot.ledger import default_worker

    ledger = open_ledger(settings, workdir)
    try:
        return ledger.release_worker(
            default_worker(), f"stopped; a step still ran {settings.daemon.grace_seconds:g} s "
                              "after the stop request")
    finally:
        ledger.close()


class Lease:
    """Renews a claim from a background thread while its candidate runs (a long merge or
    upload never lets the lease lapse, so no second worker takes it); `lost` says why the
    claim was lost, if it was."""

    def __init__(self, ledger, entry, every: float) -> None:
        self.ledger, self.entry, self.every = ledger, entry, every
        self.lost: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._done.wait(self.every):
            try:
                self.ledger.heartbeat(self.entry)
            except LedgerError as e:
                self.lost = str(e)
                return


def _process_entry(ledger, entry, settings: Settings, workdir: Path,
                   candidate: Candidate | Skip | None = None, log: Log = lambda _: None,
                   stop: Stop = lambda: False) -> CandidateOutcome:
    """Process a claimed entry; the ledger ends published, skipped, failed (retried after a
    wait) or deferred, or, when stopped mid-way, the entry is released (queued again, the
    attempt not counted) and Stopped raised."""
    lease = Lease(ledger, entry, every=settings.ledger.lease_seconds / 4)
    try:
        with lease:
            if candidate is None:  # claimed from the queue (discovery or a webhook)
                candidate = _judge_again(entry, settings)
            if isinstance(candidate, Skip):
                ledger.finish(entry, "skipped", candidate.reason)
                return Skipped(candidate)
            outcome = process(candidate, settings, workdir, log,
                              lambda: lease.lost is not None or stop())
    except Stopped as e:
        if lease.lost is not None:  # another worker has it now: it is theirs to finish
            return NotProcessed(entry.repo, entry.revision, "unclaimable", lease.lost)
        ledger.release(entry, str(e))
        raise
    except BaseException as e:
        return _end_badly(ledger, entry, e, settings, workdir, log)
    finally:
        if isinstance(candidate, Candidate):
            _evict(candidate, settings, log)
    ledger.finish(entry, outcome.status, outcome.reason, selection=asdict(outcome.selection),
                  links=outcome.publication.links, feed=outcome.feed_pending)
    return outcome


def _end_badly(ledger, entry, e: BaseException, settings: Settings, workdir: Path,
               log: Log) -> CandidateOutcome:
    """The outcome of a candidate that raised, recorded in the ledger: deferred (the Hub or
    the disk failed for a while), skipped (its revision is gone), failed (anything else, with
    a one-line reason; retried after a wait). An interrupt releases it and goes on up."""
    if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: released, then raised
        with suppress(LedgerError):
            ledger.release(entry, f"interrupted ({type(e).__name__})")
        raise e
    reason = one_line(e)
    where = f"{entry.repo}@{entry.revision[:8]}"
    if getattr(e, "transient", False):
        ledger.defer(entry, reason)
        log(f"{where}: deferred: {reason}")
        return NotProcessed(entry.repo, entry.revision, "deferred", reason)
    if isinstance(e, GoneError):
        ledger.finish(entry, "skipped", f"gone from the Hub: {reason}")
        return Skipped(Skip(entry.repo, entry.revision, entry.base or "", entry.kind,
                            f"gone from the Hub: {reason}"))
    if not isinstance(e, SafeguardError):  # a bug, a hostile repo, memory or disk: logged
        logging.getLogger("safeguard").error(f"{where} failed", exc_info=e)
    pending = _try_feed(settings, workdir, [_failure_record(entry, reason)], log)
    ledger.fail(entry, reason, feed=pending)
    log(f"{where}: failed: {reason}")
    return NotProcessed(entry.repo, entry.revision, "failed", reason)


def _evict(candidate: Candidate, settings: Settings, log: Log) -> None:
    """The fine-tune leaves the download cache (bases stay: every candidate reuses them)."""
    if settings.hub.keep_finetunes or candidate.repo in settings.watch.bases:
        return
    try:
        freed = hub.evict(candidate.repo, candidate.revision)
    except OSError as e:
        log(f"{candidate.repo}: could not clear it from the cache: {e}")
        return
    if freed:
        log(f"{candidate.repo}: {freed / 1e6:.1f} MB freed from the cache")


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
    _check_disk(candidate, settings, workdir)
    with timer.step("sweep"):
        base_dir = hub.resolve_model(candidate.base, quiet=True)
        ft_dir = hub.resolve_model(ft_ref, quiet=True)
        report = sweep_dirs(base_dir, ft_dir, _sweep_settings(candidate, settings),
                            lambda i, n, what: _raise_if_stopped(stop), (candidate.base, ft_ref))
    name = f"{candidate.repo.replace('/', '--')}@{candidate.revision[:12]}"
    report_path, plot = write_report(report, workdir / "reports" / f"{name}.json")
    merged, stripped = None, {}
    try:
        if report.selection.publish and candidate.action in ("pull-request", "variant"):
            merged = workdir / "merged" / name
            with timer.step("merge"):
                stripped = _merge_selected(candidate, base_dir, ft_dir,
                                           report.selection.weight, merged, settings)
        with timer.step("publish"):
            publication = publish(candidate, report, merged, plot, settings, stripped)
    finally:  # published or not, the merged weights go; the report stays
        if merged is not None:
            shutil.rmtree(merged, ignore_errors=True)
    record = feed.record(candidate.repo, candidate.revision, candidate.base,
                         publication.decision, publication.reason, report, publication.links)
    pending = None
    if publication.decision != "withheld":  # its owner keeps it out of the feed too
        with timer.step("feed"):
            pending = _try_feed(settings, workdir, [record], log)
    return Processed(
        candidate, publication, report.selection,
        AsrChange(report.base_point.asr, report.finetune_point.asr, record.asr_merged),
        record.retention, str(report_path),
        {**timer.seconds, **{f"sweep_{k}": v for k, v in report.timings.items()
                             if k.endswith("_seconds")}}, pending)


def _check_disk(candidate: Candidate, settings: Settings, workdir: Path) -> None:
    """DiskSpaceError (a deferral) unless the disks hold what this candidate will write: the
    fine-tune's download, the base's unless cached, the merged weights, and the margin."""
    publishes = candidate.action in ("pull-request", "variant")
    base = hub.model_info(candidate.base)
    weights = [s for s in base.siblings or [] if s.rfilename.endswith(".safetensors")]
    base_bytes = sum(s.size or 0 for s in weights)
    cached = bool(weights) and all(hub.cached(candidate.base, base.sha, s.rfilename)
                                   for s in weights)
    merged = (base_bytes if candidate.kind == "adapter" else candidate.size_bytes) \
        if publishes else 0
    need: dict[int, list] = {}  # per disk: [a path on it, bytes]
    for path, size in ((hub.cache_dir(), candidate.size_bytes + (0 if cached else base_bytes)),
                       (workdir, merged)):
        path = _existing(path)
        need.setdefault(os.stat(path).st_dev, [path, 0.0])[1] += size
    margin = settings.hub.disk_margin_gb * 1e9
    for path, size in need.values():
        free = shutil.disk_usage(path).free
        if size + margin > free:
            raise DiskSpaceError(
                f"not enough disk for {candidate.repo}: {(size + margin) / 1e9:.1f} GB needed "
                f"(download + merge + hub.disk_margin_gb), {free / 1e9:.1f} GB free at {path}")


def _existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (a cache or work dir not made yet)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _sweep_settings(candidate: Candidate, settings: Settings) -> Settings:
    """The settings with the candidate's own task file, where config names one."""
    ev = settings.evaluate
    if candidate.repo in ev.task_files:
        ev = ev.model_copy(update={"task_file": ev.task_files[candidate.repo]})
    return settings.model_copy(update={"evaluate": ev})


def _merge_selected(candidate: Candidate, base_dir: Path, ft_dir: Path, weight: float | None,
                    out: Path, settings: Settings) -> dict[str, list[str]]:
    """Write the selected merge (an adapter for an adapter's pull request, where the method
    keeps the low-rank form) into `out`; returns what it stripped as remote code."""
    from bot.merge.engine import MergeRequest, merge_models
    from bot.merge.methods import method_named

    s = settings.sweep
    method = method_named(s.method)
    return merge_models(MergeRequest(
        base_dir, ft_dir, out, s.method, weight, s.density if method.uses_density else None,
        s.seed, s.dtype, device=s.device,
        as_adapter=candidate.kind == "adapter" and candidate.action == "pull-request"
        and method.keeps_adapter_form, overwrite=True), quiet=True).stripped


def _try_feed(settings: Settings, workdir: Path, records: list, log: Log) -> str | None:
    """`_feed`; when it fails, the records as JSON lines, for the ledger to keep until a later
    cycle pushes them (`push_pending_feed`)."""
    try:
        _feed(settings, workdir, records)
        return None
    except (SafeguardError, OSError) as e:
        log(f"feed: kept for the next cycle: {one_line(e)}")
        return "\n".join(r.to_json() for r in records)


def _feed(settings: Settings, workdir: Path, records: list) -> None:
    """Write the records locally, then append them to the results dataset on the Hub."""
    from bot.publish import feed

    feed.write_local(records, Path(settings.publish.feed_dir or workdir / "feed"),
                     settings.publish.templates_dir)
    feed.push(records, feed.results_repo(settings.publish))


def _failure_record(entry, reason: str):
    from bot.publish import feed

    return feed.record(entry.repo, entry.revision, entry.base or "", "failed", reason)
