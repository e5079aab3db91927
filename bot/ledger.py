"""The ledger: the bot's durable memory of which (repo, revision) it has processed.

One row per (repo, revision) with its status (queued, running, published, skipped, failed).
SQLite in the work dir by default; a SQLAlchemy URL for a PostgreSQL shared by several runners.

A claim is a compare-and-set UPDATE inside a write transaction (BEGIN IMMEDIATE on SQLite,
SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL), so two processes never run one candidate at
once. A claim is also a lease: an entry whose worker was killed becomes claimable again when its
lease expires. Every claim counts an attempt; after max_attempts the entry stays failed. A
failed entry waits before its next claim (`retry_at`: retry_seconds x 2^(attempt - 1)); one that
the Hub could not serve for a while is deferred: queued again with the same wait, the attempt
not counted. Each claim carries a fresh token, so a worker whose claim was taken over cannot
write any more. A published entry whose feed record could not be pushed keeps it
(`feed_pending`) until a later cycle pushes it.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from bot.database import add_missing_columns, create_engine, to_url
from bot.errors import LedgerError, UsageError

STATUSES = ("queued", "running", "published", "skipped", "failed")
FINISHED = ("published", "skipped", "failed")  # the statuses finish() accepts
KINDS = ("model", "adapter")
SCHEMA_LOCK = 0x5AFE_6DA2  # PostgreSQL advisory lock serializing concurrent schema creation
CLAIM_TRIES = 8

metadata = sa.MetaData()
_status_list = ", ".join(f"'{s}'" for s in STATUSES)
_kind_list = ", ".join(f"'{k}'" for k in KINDS)
table = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("repo", sa.String, primary_key=True),
    sa.Column("revision", sa.String, primary_key=True),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("base", sa.String),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("selection", sa.Text),  # JSON
    sa.Column("links", sa.Text),  # JSON
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker", sa.String),  # who claimed it last
    sa.Column("token", sa.String),  # the current claim's id; NULL when not running
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("claimed_at", sa.DateTime(timezone=True)),
    sa.Column("expires_at", sa.DateTime(timezone=True)),  # claim expiry; heartbeat moves it
    sa.Column("retry_at", sa.DateTime(timezone=True)),  # not claimable before (a backoff)
    sa.Column("deferrals", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("feed_pending", sa.Text),  # a feed record (JSON line) not yet on the Hub
    sa.CheckConstraint(f"status IN ({_status_list})", name="ledger_status"),
    sa.CheckConstraint(f"kind IN ({_kind_list})", name="ledger_kind"),
    sa.CheckConstraint("attempts >= 0", name="ledger_attempts"),
    sa.Index("ix_ledger_entries_status_updated", "status", "updated_at"),
)


@dataclass(frozen=True)
class Entry:
    """One (repo, revision) as the ledger knows it; a claim's handle while it is running."""

    repo: str
    revision: str
    kind: str
    base: str | None
    status: str
    reason: str
    attempts: int
    worker: str | None
    selection: dict[str, Any] | None = field(default=None, hash=False)
    links: dict[str, Any] | None = field(default=None, hash=False)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    claimed_at: datetime | None = None
    expires_at: datetime | None = None
    retry_at: datetime | None = None
    deferrals: int = 0
    feed_pending: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        """(repo, revision)."""
        return self.repo, self.revision


def default_worker() -> str:
    """A worker name unique on this host: hostname:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Ledger:
    """The record of (repo, revision) -> status, on SQLite or PostgreSQL.

    Args:
        url: a path (a SQLite file, created with its folder; a directory means DIR/ledger.sqlite)
            or a SQLAlchemy URL (`sqlite:///FILE`, `postgresql+psycopg://user@host:port/db`;
            `postgresql://` means psycopg 3).
        max_attempts: claims an entry gets before it stays failed.
        lease_seconds: how long a claim lasts without a heartbeat; a running entry whose lease
            has expired (its process was killed) is claimable again, counting an attempt.
        retry_seconds: the wait after a first failure or deferral, doubled after each next one.
        max_retry_seconds: the longest wait.
    """

    def __init__(self, url: str | Path, *, max_attempts: int = 4,
                 lease_seconds: float = 3600, retry_seconds: float = 600,
                 max_retry_seconds: float = 6 * 3600) -> None:
        if max_attempts < 1:
            raise UsageError(f"max_attempts must be at least 1, not {max_attempts}")
        if lease_seconds <= 0:
            raise UsageError(f"lease_seconds must be positive, not {lease_seconds}")
        if retry_seconds < 0 or max_retry_seconds < 0:
            raise UsageError("retry_seconds and max_retry_seconds cannot be negative")
        self.max_attempts = max_attempts
        self.lease = timedelta(seconds=lease_seconds)
        self.retry_seconds, self.max_retry_seconds = retry_seconds, max_retry_seconds
        self.url = to_url(url)
        self._shown = self.url.render_as_string(hide_password=True)
        self._sqlite = self.url.get_backend_name() == "sqlite"
        self._engine = create_engine(self.url)
        self._insert = sqlite.insert if self._sqlite else postgresql.insert
        with self._tx() as conn:
            if not self._sqlite:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK)))
            metadata.create_all(conn)
            add_missing_columns(conn, table)

    def __repr__(self) -> str:
        return f"Ledger({self._shown!r})"

    def close(self) -> None:
        """Close the database connections."""
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enqueue(self, repo: str, revision: str, kind: str = "model",
                base: str | None = None, later: str | None = None) -> bool:
        """Queue (repo, revision) for processing; False, changing nothing, if already known.
        With `later` (why), it is a first deferral: claimable after one retry wait."""
        values = _new_row(repo, revision, kind, base, "queued", later or "")
        if later is not None:
            values.update(deferrals=1, retry_at=values["created_at"] + self._backoff(1))
        with self._tx() as conn:
            return conn.execute(self._add(values)).first() is not None

    def skip(self, repo: str, revision: str, reason: str, kind: str = "model",
             base: str | None = None) -> None:
        """Record that (repo, revision) is skipped, with why; an existing entry changes only
        while it is still queued."""
        values = _new_row(repo, revision, kind, base, "skipped", reason)
        with self._tx() as conn:
            if conn.execute(self._add(values)).first() is None:
                conn.execute(sa.update(table).where(*_key(repo, revision),
                                                    table.c.status == "queued")
                             .values(status="skipped", reason=reason, kind=kind, base=base,
                                     updated_at=values["updated_at"]))

    def claim(self, worker: str, repo: str | None = None,
              revision: str | None = None) -> Entry | None:
        """Atomically take one claimable entry (or the one named), or None if there is none.

        Claimable: queued, failed with attempts left, or running with an expired lease and
        attempts left (oldest update first). The entry becomes running under `worker`, with
        attempts + 1 and a lease of lease_seconds. Running entries whose lease expired with no
        attempts left become failed ("gave up after N attempts: ...").
        """
        if (repo is None) != (revision is None):
            raise UsageError("claim a specific entry with both repo and revision, or neither")
        t, now = table, _now()
        with self._tx() as conn:
            self._give_up_expired(conn, now)
            query = (sa.select(t.c.repo, t.c.revision, t.c.status, t.c.token, t.c.worker,
                               t.c.reason, t.c.expires_at)
                     .where(self._claimable(now))
                     .order_by(t.c.updated_at, t.c.repo, t.c.revision)
                     .limit(1)
                     .with_for_update(skip_locked=True))  # SQLite: nothing; BEGIN IMMEDIATE
            if repo is not None:
                query = query.where(*_key(repo, revision))
            for _ in range(CLAIM_TRIES):
                row = conn.execute(query).first()
                if row is None:
                    return None
                reason = row.reason
                if row.status == "running":
                    reason = (f"the claim by {row.worker} expired at "
                              f"{_aware(row.expires_at).isoformat(timespec='seconds')}")
                token = uuid.uuid4().hex
                taken = conn.execute(
                    sa.update(t)
                    .where(*_key(row.repo, row.revision), t.c.status == row.status,
                           _same(t.c.token, row.token))
                    .values(status="running", worker=worker, token=token, reason=reason,
                            attempts=t.c.attempts + 1, claimed_at=now,
                            expires_at=now + self.lease, updated_at=now))
                if taken.rowcount == 1:
                    return self._get(conn, row.repo, row.revision)
        return None

    def heartbeat(self, entry: Entry) -> None:
        """Extend the claim's lease by lease_seconds from now; LedgerError if it was lost."""
        with self._tx() as conn:
            done = conn.execute(sa.update(table).where(*self._held(entry))
                                .values(expires_at=_now() + self.lease))
            if done.rowcount != 1:
                raise self._lost(conn, entry)

    def finish(self, entry: Entry, status: str, reason: str = "",
               selection: dict[str, Any] | None = None,
               links: dict[str, Any] | None = None, feed: str | None = None) -> None:
        """End a claim as published, skipped or failed (failed as in `fail`), with the
        selection and links to record; `feed`: its feed record, when it is yet to be pushed."""
        _require_one_of(status, STATUSES, "status")
        if status not in FINISHED:
            raise UsageError(f"finish takes one of {', '.join(FINISHED)}, not {status!r}")
        if status == "failed":
            return self.fail(entry, reason, feed)
        self._end(entry, status=status, reason=reason, selection=_json(selection),
                  links=_json(links), feed_pending=feed, retry_at=None)

    def fail(self, entry: Entry, reason: str, feed: str | None = None) -> None:
        """End a claim as failed; it is claimed again, after a wait that doubles with each
        attempt, until it has had max_attempts, then it stays failed with reason "gave up
        after N attempts: REASON". `feed`: its feed record, to push later."""
        if entry.attempts >= self.max_attempts:
            reason = f"gave up after {entry.attempts} attempts: {reason}"
        self._end(entry, status="failed", reason=reason, feed_pending=feed,
                  retry_at=_now() + self._backoff(entry.attempts))

    def defer(self, entry: Entry, reason: str) -> None:
        """Give a claim back because the Hub (or the disk) could not serve it for now: queued
        again after a wait that doubles with each deferral, the attempt not counted (an
        outage is never a decision)."""
        waits = entry.deferrals + 1
        self._end(entry, status="queued", attempts=table.c.attempts - 1, deferrals=waits,
                  reason=f"waiting to try again: {reason}", claimed_at=None,
                  retry_at=_now() + self._backoff(waits))

    def release(self, entry: Entry, reason: str) -> None:
        """Give a claim back unfinished (e.g. on SIGTERM): queued again and its attempt not
        counted, since the candidate did not fail. (A killed process cannot release; its
        lease expires instead, and that attempt counts.)"""
        self._end(entry, status="queued", attempts=table.c.attempts - 1,
                  reason=f"released by {entry.worker}: {reason}", claimed_at=None,
                  retry_at=None)

    def release_worker(self, worker: str, reason: str) -> int:
        """Release every claim `worker` holds (its process is exiting with a step still
        running: the daemon after its grace period); how many were released."""
        with self._tx() as conn:
            return conn.execute(
                sa.update(table).where(table.c.status == "running", table.c.worker == worker)
                .values(status="queued", attempts=table.c.attempts - 1, token=None,
                        expires_at=None, claimed_at=None, retry_at=None, updated_at=_now(),
                        reason=f"released by {worker}: {reason}")).rowcount

    def feed_pending(self) -> list[Entry]:
        """Finished entries whose feed record has not reached the Hub yet."""
        query = (sa.select(table).where(table.c.feed_pending.is_not(None))
                 .order_by(table.c.updated_at))
        with self._tx(read=True) as conn:
            return [_entry(row) for row in conn.execute(query)]

    def feed_sent(self, entries: list[Entry]) -> None:
        """The feed records of `entries` are on the Hub now."""
        with self._tx() as conn:
            for e in entries:
                conn.execute(sa.update(table).where(*_key(e.repo, e.revision),
                                                    table.c.feed_pending == e.feed_pending)
                             .values(feed_pending=None))

    def seen(self, repo: str, revision: str) -> Entry | None:
        """The entry for (repo, revision), or None if the ledger has never heard of it."""
        with self._tx(read=True) as conn:
            return self._get(conn, repo, revision)

    def claimable(self) -> list[Entry]:
        """The entries `claim` could take now, oldest update first (it changes nothing)."""
        query = (sa.select(table).where(self._claimable(_now()))
                 .order_by(table.c.updated_at, table.c.repo, table.c.revision))
        with self._tx(read=True) as conn:
            return [_entry(row) for row in conn.execute(query)]

    def entries(self, status: str | None = None) -> list[Entry]:
        """Every entry (or those with `status`), oldest first."""
        query = sa.select(table).order_by(table.c.created_at, table.c.repo, table.c.revision)
        if status is not None:
            _require_one_of(status, STATUSES, "status")
            query = query.where(table.c.status == status)
        with self._tx(read=True) as conn:
            return [_entry(row) for row in conn.execute(query)]

    # internals

    @contextmanager
    def _tx(self, read: bool = False) -> Iterator[Connection]:
        """One transaction; on SQLite a write transaction takes the write lock at BEGIN."""
        try:
            with self._engine.connect() as conn:
                if read:
                    conn.execution_options(ledger_read=True)
                with conn.begin():
                    yield conn
        except sa.exc.OperationalError as e:
            raise LedgerError(f"ledger database {self._shown} failed: {e.orig}") from e

    def _add(self, values: dict[str, Any]) -> sa.Executable:
        """INSERT unless (repo, revision) exists, returning the key if inserted (INSERT's
        rowcount is not reliable on every driver)."""
        return (self._insert(table).values(values).on_conflict_do_nothing()
                .returning(table.c.repo))

    def _get(self, conn: Connection, repo: str, revision: str) -> Entry | None:
        row = conn.execute(sa.select(table).where(*_key(repo, revision))).first()
        return None if row is None else _entry(row)

    def _held(self, entry: Entry) -> tuple[sa.ColumnElement[bool], ...]:
        """The conditions under which `entry`'s claim is still held."""
        if entry.token is None:
            raise UsageError(f"{entry.repo}@{entry.revision} is not a claimed entry")
        return (*_key(entry.repo, entry.revision), table.c.status == "running",
                table.c.token == entry.token)

    def _end(self, entry: Entry, **values: Any) -> None:
        with self._tx() as conn:
            done = conn.execute(sa.update(table).where(*self._held(entry)).values(
                token=None, expires_at=None, updated_at=_now(), **values))
            if done.rowcount != 1:
                raise self._lost(conn, entry)

    def _lost(self, conn: Connection, entry: Entry) -> LedgerError:
        now = self._get(conn, entry.repo, entry.revision)
        if now is None:
            state = "it is no longer in the ledger"
        elif now.status == "running":
            state = (f"it is running (worker {now.worker}, attempt {now.attempts}): the lease "
                     "expired without a heartbeat and the entry was claimed again")
        else:
            state = f"it is {now.status} already (worker {now.worker})"
        return LedgerError(f"{entry.worker} lost its claim on {entry.repo}@{entry.revision}: "
                           f"{state}")

    def _claimable(self, now: datetime) -> sa.ColumnElement[bool]:
        """Queued or failed with attempts left, past its retry time; running with an expired
        lease and attempts left."""
        t = table
        due = sa.or_(t.c.retry_at.is_(None), t.c.retry_at <= now)
        return sa.or_(
            sa.and_(t.c.status == "queued", due),
            sa.and_(t.c.status == "failed", t.c.attempts < self.max_attempts, due),
            sa.and_(t.c.status == "running", t.c.expires_at < now,
                    t.c.attempts < self.max_attempts))

    def _backoff(self, n: int) -> timedelta:
        """The wait after the n-th failure (or deferral): retry_seconds x 2^(n - 1), capped."""
        seconds = self.retry_seconds * 2.0 ** max(0, min(n - 1, 30))
        return timedelta(seconds=min(self.max_retry_seconds, seconds))

    def _give_up_expired(self, conn: Connection, now: datetime) -> None:
        """Running entries whose lease expired with no attempts left become failed."""
        t = table
        reason = (sa.literal("gave up after ") + sa.cast(t.c.attempts, sa.String)
                  + sa.literal(" attempts: the claim by ") + sa.func.coalesce(t.c.worker, "?")
                  + sa.literal(" expired (process killed?)"))
        expired = (sa.select(t.c.repo, t.c.revision)
                   .where(t.c.status == "running", t.c.expires_at < now,
                          t.c.attempts >= self.max_attempts)
                   .with_for_update(skip_locked=True))  # never wait on another claimer's rows
        conn.execute(sa.update(t)
                     .where(sa.tuple_(t.c.repo, t.c.revision).in_(expired))
                     .values(status="failed", reason=reason, token=None, expires_at=None,
                             updated_at=now))


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back (stored as UTC); PostgreSQL, the session's zone."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _require_one_of(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise UsageError(f"unknown ledger {what} {value!r}: use one of {', '.join(allowed)}")


def _key(repo: str, revision: str) -> tuple[sa.ColumnElement[bool], ...]:
    return table.c.repo == repo, table.c.revision == revision


def _same(column: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _new_row(repo: str, revision: str, kind: str, base: str | None, status: str,
             reason: str) -> dict[str, Any]:
    if not repo or not revision:
        raise UsageError(f"a ledger entry needs a repo and a revision, not {repo!r}@{revision!r}")
    _require_one_of(kind, KINDS, "kind")
    now = _now()
    return {"repo": repo, "revision": revision, "kind": kind, "base": base, "status": status,
            "reason": reason, "attempts": 0, "deferrals": 0, "created_at": now,
            "updated_at": now}


def _entry(row: sa.Row[Any]) -> Entry:
    return Entry(
        repo=row.repo, revision=row.revision, kind=row.kind, base=row.base, status=row.status,
        reason=row.reason, attempts=row.attempts, worker=row.worker,
        selection=None if row.selection is None else json.loads(row.selection),
        links=None if row.links is None else json.loads(row.links),
        created_at=_aware(row.created_at), updated_at=_aware(row.updated_at),
        claimed_at=_aware(row.claimed_at), expires_at=_aware(row.expires_at),
        retry_at=_aware(row.retry_at), deferrals=row.deferrals or 0,
        feed_pending=row.feed_pending, token=row.token)
