"""The bot's cycle: discover -> (per candidate) checks -> sweep -> selection -> merge -> card ->
publish -> feed -> ledger.

The pipeline knows no Hub or tensor details: discovery and checks are bot/watch.py, the sweep
bot/evaluate/sweep.py, the merge bot/merge/engine.py, publishing bot/publish/, memory
bot/ledger.py. Each step's time is recorded in the result.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

from bot.config import Settings
from bot.errors import SafeguardError
from bot.watch import Candidate, Skip, candidate_for, discover

Log = Callable[[str], None]
Stop = Callable[[], bool]


class Stopped(Exception):
    """Asked to stop (the daemon's SIGTERM) in the middle of a candidate."""


def _check(stop: Stop) -> None:
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
             log: Log = lambda _: None, stop: Callable[[], bool] = lambda: False) -> dict:
    """One cycle: record new candidates and skips, then process every claimable candidate.

    `stop()` is asked between candidates (the daemon's SIGTERM): the cycle ends early and
    leaves the rest queued.
    """
    from bot.ledger import default_worker

    started = time.perf_counter()
    ledger = open_ledger(settings, workdir)
    try:
        found = discover(settings, seen=lambda repo, rev: ledger.seen(repo, rev) is not None)
        for c in found.candidates:
            ledger.enqueue(c.repo, c.revision, c.kind, c.base)
        for s in found.skips:
            ledger.skip(s.repo, s.revision, s.reason, s.kind, s.base)
        result = {**found.to_dict(), "processed": [], "stopped": False}
        if discover_only:  # what a separate processor (the Actions matrix) should also take
            new = {(c.repo, c.revision) for c in found.candidates}
            result["retry"] = [
                {"repo": e.repo, "revision": e.revision, "kind": e.kind, "base": e.base,
                 "status": e.status, "attempts": e.attempts}
                for e in ledger.claimable() if (e.repo, e.revision) not in new]
        worker = default_worker()
        while not discover_only and not stop():
            entry = ledger.claim(worker)
            if entry is None:
                break
            log(f"processing {entry.repo}@{entry.revision[:8]}")
            try:
                result["processed"].append(_process_entry(ledger, entry, settings, workdir,
                                                           log=log, stop=stop))
            except Stopped:
                log(f"released {entry.repo}@{entry.revision[:8]}: stopping")
                break
        result["stopped"] = stop()
    finally:
        ledger.close()
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def process_one(ref: str, settings: Settings, workdir: Path, log: Log = lambda _: None) -> dict:
    """`process REPO[@REV]`: one candidate end to end, through the ledger (never twice)."""
    from bot.ledger import default_worker

    repo, _, revision = ref.partition("@")
    found = candidate_for(repo, revision or None, settings)
    ledger = open_ledger(settings, workdir)
    try:
        known = ledger.seen(found.repo, found.revision)
        if known is not None and known.status in ("published", "skipped", "running"):
            return {"repo": found.repo, "revision": found.revision, "status": known.status,
                    "reason": f"already {known.status} at this revision: {known.reason}"}
        if isinstance(found, Skip):
            ledger.skip(found.repo, found.revision, found.reason, found.kind, found.base)
            return {**found.to_dict(), "status": "skipped"}
        ledger.enqueue(found.repo, found.revision, found.kind, found.base)
        entry = ledger.claim(default_worker(), found.repo, found.revision)
        if entry is None:
            return {"repo": found.repo, "revision": found.revision, "status": "unclaimable",
                    "reason": "another worker holds it, or it ran out of attempts"}
        log(f"processing {found.repo}@{found.revision[:8]}")
        return _process_entry(ledger, entry, settings, workdir, found, log)
    finally:
        ledger.close()


def _process_entry(ledger, entry, settings: Settings, workdir: Path,
                   candidate: Candidate | None = None, log: Log = lambda _: None,
                   stop: Stop = lambda: False) -> dict:
    """Process a claimed entry; the ledger ends published, skipped or failed (retryable), or,
    when stopped mid-way, the entry is released (queued again, the attempt not counted)."""
    try:
        if candidate is None:  # claimed from the queue (discovery or a webhook)
            candidate = candidate_for(entry.repo, entry.revision, settings)
            if isinstance(candidate, Candidate) and candidate.base not in settings.watch.bases:
                candidate = Skip(candidate.repo, candidate.revision, candidate.base,
                                 candidate.kind, f"its base {candidate.base} is not watched")
        if isinstance(candidate, Skip):
            ledger.finish(entry, "skipped", candidate.reason)
            return {**candidate.to_dict(), "status": "skipped"}
        def checkpoint() -> bool:  # between steps and sweep points: renew the lease
            ledger.heartbeat(entry)
            return stop()

        outcome = process(candidate, settings, workdir, log, checkpoint)
    except Stopped as e:
        ledger.release(entry, str(e))
        raise
    except SafeguardError as e:
        ledger.fail(entry, str(e))
        with suppress(SafeguardError):  # the ledger has the failure either way
            _feed(settings, workdir, [_failure_record(entry, str(e))])
        return {"repo": entry.repo, "revision": entry.revision, "status": "failed",
                "reason": str(e)}
    status = "published" if outcome["decision"] in ("pull-request", "variant") else "skipped"
    ledger.finish(entry, status, outcome["reason"], selection=outcome.get("selection"),
                  links=outcome.get("links"))
    return {**outcome, "status": status}


def process(candidate: Candidate, settings: Settings, workdir: Path,
            log: Log = lambda _: None, stop: Stop = lambda: False) -> dict:
    """Sweep, merge the selected lambda, publish, feed. Returns what happened and its timings.

    Each step is logged as "REPO: step NAME" before it starts (the daemon's log, and the
    kill-at-any-step test's cue); `stop()` is checked before each step and between the
    sweep's points, so a stop request releases the candidate within one evaluation."""
    from bot.evaluate.sweep import run_sweep, write_report
    from bot.merge.engine import MergeRequest, merge_models
    from bot.publish import feed
    from bot.publish.publisher import publish

    def announce(name: str) -> None:
        if name != "feed":  # once published, finish: the feed and the ledger must say so
            _check(stop)
        log(f"{candidate.repo}: step {name}")

    timer = Timer(announce)
    ft_ref = f"{candidate.repo}@{candidate.revision}"
    ev = settings.evaluate
    if candidate.repo in ev.task_files:
        ev = ev.model_copy(update={"task_file": ev.task_files[candidate.repo]})
    sweep_settings = settings.model_copy(update={"evaluate": ev})
    with timer.step("sweep"):
        report = run_sweep(candidate.base, ft_ref, sweep_settings,
                           lambda i, n, what: _check(stop))
    name = f"{candidate.repo.replace('/', '--')}@{candidate.revision[:12]}"
    report_path, plot = write_report(report, workdir / "reports" / f"{name}.json")
    merged = None
    wants_weights = candidate.action in ("pull-request", "variant")
    if report.selection.publish and wants_weights:
        merged = workdir / "merged" / name
        s = settings.sweep
        with timer.step("merge"):
            merge_models(MergeRequest(
                candidate.base, ft_ref, merged, s.method, report.selection.weight,
                s.density if s.method in ("ties", "dare_linear", "dare_ties") else None,
                s.seed, s.dtype, device=s.device,
                as_adapter=candidate.kind == "adapter" and candidate.action == "pull-request"
                and s.method == "linear", overwrite=True), quiet=True)
    with timer.step("publish"):
        publication = publish(candidate, report, merged, plot, settings)
    record = feed.record(candidate.repo, candidate.revision, candidate.base,
                         publication.decision, publication.reason, report, publication.links)
    with timer.step("feed"):
        _feed(settings, workdir, [record])
    if merged is not None:
        shutil.rmtree(merged, ignore_errors=True)  # published; the report stays
    selection = asdict(report.selection)
    return {"repo": candidate.repo, "revision": candidate.revision, "base": candidate.base,
            "kind": candidate.kind, "action": candidate.action,
            "decision": publication.decision, "reason": publication.reason,
            "links": publication.links, "selection": selection,
            "asr": {"base": report.base_point.asr, "finetune": report.finetune_point.asr,
                    "merged": record.asr_merged},
            "retention": record.retention, "report": str(report_path),
            "timings": {**timer.seconds, **{f"sweep_{k}": v for k, v in report.timings.items()
                                             if k.endswith("_seconds")}}}


def _feed(settings: Settings, workdir: Path, records: list) -> None:
    """Write the records locally, then append them to the results dataset on the Hub."""
    from bot import hub
    from bot.publish import feed

    feed.write_local(records, Path(settings.publish.feed_dir or workdir / "feed"))
    repo = settings.publish.feed_repo or \
        f"{settings.publish.variant_owner or hub.whoami()}/safeguard-results"
    feed.push(records, repo)


def _failure_record(entry, reason: str):
    from bot.publish import feed

    return feed.record(entry.repo, entry.revision, entry.base or "", "failed", reason)
