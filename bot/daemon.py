"""`safeguard-bot watch`: the scheduled daemon.

APScheduler runs one cycle (bot/pipeline.py run_once) at a time on the configured interval or
cron (`[daemon]`); a cycle still running when the next is due makes that one wait (no overlap,
missed runs coalesced). SIGTERM or SIGINT: the current candidate is released back to the
ledger within one evaluation step (or finished, once publishing has begun), then the daemon
exits 0; a step still running after daemon.grace_seconds (a Hub call that hangs) has its
candidate released by the main thread, and the daemon exits anyway. Each cycle ends with one
health line.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bot.config import Settings
from bot.results import CycleResult

log = logging.getLogger("safeguard")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and any `extra={"data": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                 "level": record.levelname.lower(), "message": record.getMessage()}
        entry.update(getattr(record, "data", {}))
        return json.dumps(entry)


def configure_logging(as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def trigger(settings: Settings):
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    if settings.daemon.cron:
        return CronTrigger.from_crontab(settings.daemon.cron)
    return IntervalTrigger(seconds=settings.daemon.interval_minutes * 60)


def watch(settings: Settings, workdir: Path, max_cycles: int | None = None,
          cycle: Callable[..., CycleResult] | None = None) -> int:
    """Run cycles until SIGTERM/SIGINT (or `max_cycles`); returns the number of cycles run."""
    from apscheduler.schedulers.blocking import BlockingScheduler

    from bot.pipeline import run_once

    cycle = cycle or run_once
    stopping, idle = threading.Event(), threading.Event()
    idle.set()
    done = {"cycles": 0}
    scheduler = BlockingScheduler()

    def one_cycle() -> None:
        if stopping.is_set():
            return
        idle.clear()
        started = time.perf_counter()
        try:
            result = cycle(settings, workdir, log=lambda m: log.info(m),
                           stop=stopping.is_set)
        except Exception as e:  # noqa: BLE001 - a bad cycle is logged; the daemon goes on
            log.error(f"cycle failed: {e}", extra={"data": {"event": "cycle-failed"}})
            result = None
        done["cycles"] += 1
        if result is not None:
            health(result, time.perf_counter() - started, done["cycles"])
        if max_cycles and done["cycles"] >= max_cycles:
            stopping.set()
        idle.set()
        if stopping.is_set() and scheduler.running:
            scheduler.shutdown(wait=False)

    def on_signal(signum, _frame) -> None:
        log.info(f"{signal.Signals(signum).name}: stopping after the current step",
                 extra={"data": {"event": "stopping"}})
        stopping.set()
        if scheduler.running:
            scheduler.shutdown(wait=False)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    # the first cycle starts now; the job runs in the scheduler's thread pool, one at a time
    scheduler.add_job(one_cycle, trigger(settings), id="cycle", max_instances=1,
                      coalesce=True, next_run_time=_now())
    try:
        log.info(f"watching {len(settings.watch.bases)} base(s); "
                 + (f"cron {settings.daemon.cron}" if settings.daemon.cron
                    else f"every {settings.daemon.interval_minutes} min"),
                 extra={"data": {"event": "start"}})
        scheduler.start()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # a cycle that is releasing its candidate ends first, within the grace period
    if not idle.wait(settings.daemon.grace_seconds):
        _release_held(settings, workdir)
    log.info(f"stopped after {done['cycles']} cycle(s)", extra={"data": {"event": "stop"}})
    return done["cycles"]


def _release_held(settings: Settings, workdir: Path) -> None:
    """Give back what this process holds (its step did not end within the grace period); the
    step's thread is left behind and ends with the process."""
    from bot.pipeline import release_held

    released = release_held(settings, workdir)
    log.warning(f"a step did not end within {settings.daemon.grace_seconds:g} s of the stop "
                f"request: released {released} candidate(s) and stopping anyway",
                extra={"data": {"event": "grace-expired", "released": released}})


def health(result: CycleResult, seconds: float, number: int) -> None:
    """Log one line on how a cycle went (with its numbers as data, for --log-json)."""
    found = result.discovery
    counts = {k: result.count(k) for k in ("published", "skipped", "failed")}
    waiting = result.count("deferred")
    log.info(f"health: cycle {number} in {seconds:.1f} s: {len(found.candidates)} new, "
             f"{len(found.skips)} skipped at discovery, {found.already_seen} seen, "
             f"{found.deferred} deferred, {len(found.later)} to judge later, "
             f"{len(found.errors)} listing error(s); processed {len(result.processed)} "
             f"(published {counts['published']}, not published {counts['skipped']}, failed "
             f"{counts['failed']}, waiting to try again {waiting})"
             + ("; stopped" if result.stopped else ""),
             extra={"data": {"event": "health", "cycle": number, "seconds": round(seconds, 3),
                             "new": len(found.candidates), "skips": len(found.skips),
                             "deferred": found.deferred, "later": len(found.later),
                             "listing_errors": len(found.errors), "waiting": waiting,
                             **counts}})


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)
