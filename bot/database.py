"""The ledger's database: a path or URL made an engine (SQLite with WAL, a busy timeout and
transactions the ledger begins itself; PostgreSQL through psycopg), and a table brought up to
date with the columns added since it was made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from bot.config import without_password
from bot.errors import LedgerError, UsageError

DEFAULT_FILE = "ledger.sqlite"  # the file used when the ledger is given a directory
SQLITE_BUSY_TIMEOUT_S = 60  # a writer waits this long for another process's transaction


def add_missing_columns(conn: Connection, table: sa.Table) -> None:
    """A ledger made by an earlier version gets the columns added since (all nullable or
    defaulted, so its rows stay as they were)."""
    present = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    for column in table.columns:
        if column.name not in present:
            kind = column.type.compile(dialect=conn.dialect)
            default = f" DEFAULT {column.server_default.arg}" if column.server_default else ""
            conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" '
                                 f"{kind}{default}{'' if column.nullable else ' NOT NULL'}")


def to_url(url: str | Path) -> sa.URL:
    """A path becomes a SQLite file URL; a URL is checked for a supported backend."""
    if isinstance(url, Path) or "://" not in url:
        path = Path(url).expanduser()
        if path.is_dir():
            path = path / DEFAULT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return sa.URL.create("sqlite+pysqlite", database=str(path.resolve()))
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as e:
        raise UsageError(f"not a ledger path or database URL: {without_password(url)!r}") from e
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise UsageError(f"the ledger runs on SQLite or PostgreSQL, not {backend!r} "
                         f"({without_password(url)})")
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise UsageError("the ledger must outlive the process: give SQLite a file")
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return parsed


def create_engine(url: sa.URL) -> sa.Engine:
    """An engine; SQLite gets WAL, a busy timeout and transactions begun by us."""
    if url.get_backend_name() == "postgresql":
        try:
            return sa.create_engine(url, pool_pre_ping=True)
        except ImportError as e:
            raise LedgerError(f"a PostgreSQL ledger needs the psycopg driver ({e}): "
                              "pip install 'safeguard-bot[postgres]'") from e
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver begins nothing; _begin below does
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front (waiting up to the busy timeout),
        # so its reads and its compare-and-set update see the same, latest state.
        read = conn.get_execution_options().get("ledger_read", False)
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

    return engine
