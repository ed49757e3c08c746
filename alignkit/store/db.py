"""Opening a label store: a SQLite file (default) or a PostgreSQL URL, schema-versioned.

SQLite is run in WAL mode with a busy timeout, and every transaction that may
write starts with `BEGIN IMMEDIATE`: it takes the write lock before its first
read, so two read-then-write transactions can never both read and then fail
with "database is locked" on the upgrade to a write lock (the deferred default
fails for most writers once a handful run at once). SQLAlchemy's pysqlite
recipe is used for that: the driver's own BEGIN handling is switched off
(`isolation_level = None`) and a `begin` event emits ours. Read-only work asks
for `BEGIN DEFERRED` through the `sqlite_begin` execution option, so readers
never wait for writers under WAL. A transaction that still meets "locked" or
"busy" (or, on PostgreSQL, a serialization failure or deadlock) is retried
from the start with backoff.

`synchronous=NORMAL` with WAL keeps every committed transaction across a crash
of the process (SIGKILL included); only an OS crash or power loss can lose the
last commits.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sqlalchemy import Connection, create_engine, event, inspect, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from alignkit.errors import UserError
from alignkit.store.models import Base, SchemaVersion

SCHEMA_VERSION = 5


def _add_arena(conn: Connection) -> None:
    """v1 -> v2: comparisons get the `arena` flag (every existing one is an ordinary comparison),
    and the queue's index leads with it, as a fresh v2 store has it."""
    conn.execute(text("ALTER TABLE comparisons ADD COLUMN arena BOOLEAN NOT NULL DEFAULT FALSE"))
    conn.execute(text("DROP INDEX ix_comparison_open"))
    conn.execute(text("CREATE INDEX ix_comparison_open ON comparisons (arena, n_votes, id)"))


def _add_gold_exclusion_and_strength(conn: Connection) -> None:
    """v2 -> v3: comparisons get `gold` (none is a gold item yet), annotators `excluded` (nobody is), votes
    `strength` (none has one), and the `store_settings` table (no scale, no guidelines)."""
    conn.execute(text("ALTER TABLE comparisons ADD COLUMN gold VARCHAR(8)"))
    conn.execute(text("ALTER TABLE annotators ADD COLUMN excluded BOOLEAN NOT NULL DEFAULT FALSE"))
    conn.execute(text("ALTER TABLE votes ADD COLUMN strength INTEGER"))
    Base.metadata.tables["store_settings"].create(conn)


def _add_loop_tags(conn: Connection) -> None:
    """v3 -> v4: comparisons get the loop's tags (round, generating stage, selection score); none has them."""
    conn.execute(text("ALTER TABLE comparisons ADD COLUMN loop_round INTEGER"))
    conn.execute(text("ALTER TABLE comparisons ADD COLUMN source_stage VARCHAR(500)"))
    conn.execute(text("ALTER TABLE comparisons ADD COLUMN selection_score FLOAT"))


def _add_reveal_rankings_criteria_adjudication(conn: Connection) -> None:
    """v4 -> v5: comparisons get `ranking_json` (none is a ranking task), votes `revealed_at`, `ranking_json` and
    `criteria_json` (none has them: an arena vote of an older store counts as revealed, as it was shown at once),
    and the `adjudications` table (empty)."""
    conn.execute(text("ALTER TABLE comparisons ADD COLUMN ranking_json TEXT"))
    for column in ("revealed_at FLOAT", "ranking_json TEXT", "criteria_json TEXT"):
        conn.execute(text(f"ALTER TABLE votes ADD COLUMN {column}"))
    conn.execute(text("UPDATE votes SET revealed_at = created_at WHERE comparison_id IN "
                      "(SELECT id FROM comparisons WHERE arena)"))
    Base.metadata.tables["adjudications"].create(conn)


# Forward migrations: MIGRATIONS[v] upgrades a store at version v to v + 1, inside
# the transaction that then records the new version. A newer alignkit therefore
# opens an older store; an older alignkit refuses a newer store. Each must leave
# the same schema as a fresh store of the new version (tests/test_store.py checks).
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _add_arena, 2: _add_gold_exclusion_and_strength,
                                                     3: _add_loop_tags, 4: _add_reveal_rankings_criteria_adjudication}

SQLITE_BUSY_TIMEOUT_MS = 10_000
MAX_RETRIES = 12

T = TypeVar("T")


def _is_retryable(err: DBAPIError) -> bool:
    orig = err.orig
    if isinstance(orig, sqlite3.OperationalError):
        msg = str(orig).lower()
        return "locked" in msg or "busy" in msg
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg
    return sqlstate in ("40001", "40P01")  # serialization_failure, deadlock_detected


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # pragma: no cover - exercised by every sqlite test
        # Switch off pysqlite's own BEGIN handling; the `begin` hook below emits ours.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _resolve_url(url_or_path: str | Path, *, create: bool, look_inside: bool = True) -> tuple[str, str]:
    """(SQLAlchemy URL, a name for messages). look_inside=False: an existing SQLite file is not opened."""
    s = str(url_or_path)
    if s.startswith("sqlite") and "://" in s:
        # A sqlite:/// URL is the file it names (same checks as a path). In memory, every pooled
        # connection would open its own empty database: refused rather than half-working.
        database = make_url(s).database
        if not database or database == ":memory:" or "mode=memory" in s:
            raise UserError(f"label store {s}: an in-memory SQLite database is not supported "
                            "(it would be empty in every connection and gone at exit); give a file path")
        s = database
    elif "://" in s:
        if s.startswith(("postgresql://", "postgres://")):
            s = "postgresql+psycopg://" + s.split("://", 1)[1]
        if not s.startswith("postgresql+psycopg://"):
            raise UserError(f"label store URL {s.split('://')[0]}:// is not supported (use a file path or postgresql+psycopg://...)")
        return s, s.split("@")[-1]
    path = Path(s).expanduser().resolve()
    if path.is_dir():
        raise UserError(f"label store {s} is a directory, expected a database file")
    if not path.exists():
        if not create:
            raise UserError(f"no label store at {s} (create one with `alignkit label import --db {s} FILE`)")
        if not path.parent.is_dir():
            raise UserError(f"cannot create label store {s}: directory {path.parent} does not exist")
    elif look_inside:
        _check_sqlite_file(path, s, create=create)
    return f"sqlite:///{path}", s


def _check_sqlite_file(path: Path, name: str, *, create: bool) -> None:
    """Look at an existing file read-only before the engine opens it: opening switches the file to WAL, and
    a store is created in an empty database — neither may happen to a file that is not (yet) a label store."""
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        if "not a database" in str(err) or "malformed" in str(err):
            raise UserError(f"{name} is not a SQLite database") from None
        raise UserError(f"cannot open label store {name}: {err}") from None
    _check_tables(tables, name, create=create)


def _check_tables(tables: set[str], name: str, *, create: bool) -> None:
    """Refuse a database that is not a label store; an empty one only becomes one when asked to create."""
    if "schema_version" in tables:
        return
    if tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise UserError(f"{name} is not an alignkit label store (it has other tables: {shown}); "
                        "give a new file or an empty database")
    if not create:
        raise UserError(f"no label store in {name}: the database is empty "
                        f"(create one with `alignkit label import --db {name} FILE`)")


def display_name(url_or_path: str | Path) -> str:
    """A label store's path or URL as it may be printed or saved: a URL's password is masked."""
    s = str(url_or_path)
    if "://" in s and not s.startswith("sqlite"):
        try:
            return make_url(s).render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy parses: _resolve_url refuses it with its own message
            return s.split("@")[-1]
    return s


class Store:
    """A label store: an engine plus transaction helpers that retry on lock contention.

    `overlap` is how many distinct annotators each comparison goes to,
    `lease_seconds` how long an assignment is held before it is served again, and
    `gold_rate` the share of new leases that are gold items; the queue functions take
    them from here unless told otherwise.
    """

    def __init__(self, engine: Engine, name: str, *, overlap: int = 3, lease_seconds: float = 600.0,
                 gold_rate: float = 0.0):
        self.engine = engine
        self.name = name
        self.overlap = overlap
        self.lease_seconds = lease_seconds
        self.gold_rate = gold_rate
        self.dialect = engine.dialect.name  # "sqlite" | "postgresql"
        self._read_engine = engine.execution_options(sqlite_begin="DEFERRED")
        # SQLite takes one writer at a time; threads of this process queue on a lock instead of
        # polling the file lock in SQLite's busy handler (which sleeps in growing steps).
        # Other processes are still kept out by BEGIN IMMEDIATE + busy_timeout + retry.
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else nullcontext()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (deferred transaction on SQLite: it never waits for writers)."""
        with Session(self._read_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def write(self, fn: Callable[[Session], T]) -> T:
        """Run fn(session) in one write transaction, retried from the start on lock contention.

        fn must be safe to run again: it sees none of a failed attempt's effects.
        """
        for attempt in range(MAX_RETRIES):
            try:
                with self._write_lock, Session(self.engine, expire_on_commit=False) as session, session.begin():
                    return fn(session)
            except (OperationalError, DBAPIError) as err:
                if not _is_retryable(err) or attempt == MAX_RETRIES - 1:
                    raise
                time.sleep(min(0.5, 0.005 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.name!r}, {self.dialect})"


def open_store(url_or_path: str | Path, *, create: bool = True, overlap: int = 3, lease_seconds: float = 600.0,
               pool_size: int = 20, gold_rate: float = 0.0) -> Store:
    """Open (and create or migrate) a label store: a file path means SQLite, or a postgresql+psycopg:// URL."""
    url, name = _resolve_url(url_or_path, create=create)
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                               connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _install_sqlite_hooks(engine)
    else:
        engine = _postgres_engine(url, pool_size=pool_size)
    store = Store(engine, name, overlap=overlap, lease_seconds=lease_seconds, gold_rate=gold_rate)
    try:
        _ensure_schema(store, create=create)
    except UserError:
        engine.dispose()
        raise
    except DBAPIError as err:
        engine.dispose()
        raise UserError(f"cannot open label store {name}: {str(err.orig).strip().splitlines()[0]}") from None
    return store


def check_store(url_or_path: str | Path, *, create: bool, look_inside: bool = True) -> None:
    """Fail now, as open_store would, without writing anything: for commands that work for minutes
    (sampling responses) before they open the store. look_inside=False checks only what needs no
    connection (a store file that does not exist, a bad URL): reading a SQLite file in WAL mode,
    even read-only, leaves its -shm file behind."""
    url, name = _resolve_url(url_or_path, create=create, look_inside=look_inside)
    if url.startswith("sqlite") or not look_inside:
        return
    engine = _postgres_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            _check_tables(set(inspect(conn).get_table_names()), name, create=create)
    except DBAPIError as err:
        raise UserError(f"cannot open label store {name}: {str(err.orig).strip().splitlines()[0]}") from None
    finally:
        engine.dispose()


def _postgres_engine(url: str, *, pool_size: int) -> Engine:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise UserError("a PostgreSQL label store needs psycopg: pip install 'alignkit[postgres]'") from None
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _ensure_schema(store: Store, *, create: bool) -> None:
    def run(session: Session) -> None:
        conn = session.connection()
        if store.dialect == "postgresql":
            # Two processes opening a fresh database at once: one creates, the other waits.
            conn.execute(text("SELECT pg_advisory_xact_lock(7418261)"))
        tables = set(inspect(conn).get_table_names())
        if "schema_version" not in tables:
            _check_tables(tables, store.name, create=create)
            Base.metadata.create_all(conn)
            session.add(SchemaVersion(id=1, version=SCHEMA_VERSION, updated_at=time.time()))
            return
        row = session.scalars(select(SchemaVersion).where(SchemaVersion.id == 1)).one_or_none()
        version = row.version if row else 0
        if version > SCHEMA_VERSION:
            raise UserError(f"label store {store.name} has schema version {version}, newer than this alignkit "
                            f"understands ({SCHEMA_VERSION}): upgrade alignkit")
        while version < SCHEMA_VERSION:
            if version not in MIGRATIONS:
                raise UserError(f"label store {store.name}: no migration from schema version {version}")
            MIGRATIONS[version](conn)
            version += 1
        if row is None:
            session.add(SchemaVersion(id=1, version=version, updated_at=time.time()))
        elif row.version != version:
            row.version, row.updated_at = version, time.time()

    try:
        store.write(run)
    except DBAPIError as err:
        if isinstance(err.orig, sqlite3.DatabaseError) and "not a database" in str(err.orig):
            raise UserError(f"{store.name} is not a SQLite database") from None
        raise


def schema_version(store: Store) -> int:
    with store.read() as s:
        return s.scalars(select(SchemaVersion.version)).one()
