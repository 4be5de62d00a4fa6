"""The one SQLite connection behind the index: reads, write transactions that take turns, timings.

Only the modules of ``storage.index`` use it; everything else asks ``Metadata``
for what it needs by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar, cast

import aiosqlite

from storage.errors import StoreFull
from storage.index.schema import migrate

T = TypeVar("T")
Statement = tuple[str, tuple]
# Statements worked out inside the transaction that runs them (from rows it reads first),
# on the connection's thread.
Prepared = Callable[[sqlite3.Connection], list[Statement]]


async def fetch(connection: aiosqlite.Connection, sql: str, args: tuple = ()) -> list[tuple]:
    """Every row of one query; inside a ``writing`` block, on that transaction's connection.

    One trip to the connection's thread (a cursor's execute, fetch and close are three)."""
    # No row factory is set: the rows are plain tuples.
    return cast("list[tuple]", list(await connection.execute_fetchall(sql, args)))


def _execute(connection: sqlite3.Connection, statements: list[Statement]) -> None:
    # Consecutive rows of one statement go in one executemany (a manifest's ~2 per layer).
    for sql, group in itertools.groupby(statements, key=lambda statement: statement[0]):
        rows = [args for _, args in group]
        if len(rows) == 1:
            connection.execute(sql, rows[0])
        else:
            connection.executemany(sql, rows)


def _atomically(connection: sqlite3.Connection, job: Callable[[sqlite3.Connection], T]) -> T:
    """``job`` in one write transaction, on the connection's thread: committed, or rolled back and raised."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        result = job(connection)
        connection.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (a full disk does that).
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return result


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self.observe: Callable[[str, float], None] | None = None  # (operation, seconds), for metrics

    @property
    def connection(self) -> aiosqlite.Connection:
        assert self._connection is not None, "metadata is not open"
        return self._connection

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = await aiosqlite.connect(self.path, isolation_level=None)
        await self.connection.execute("PRAGMA journal_mode=WAL")
        await self.connection.execute("PRAGMA synchronous=FULL")
        await self.connection.execute("PRAGMA foreign_keys=ON")
        await self.connection.execute("PRAGMA busy_timeout=10000")
        await migrate(self.connection)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def all(self, sql: str, args: tuple = ()) -> list[tuple]:
        started = time.perf_counter()
        rows = await fetch(self.connection, sql, args)
        if self.observe:
            self.observe("read", time.perf_counter() - started)
        return rows

    async def one(self, sql: str, args: tuple = ()) -> tuple | None:
        """The first row of a query that yields at most one."""
        rows = await self.all(sql, args)
        return rows[0] if rows else None

    async def transaction(self, statements: list[Statement] | Prepared) -> None:
        """Statements (or those ``statements`` works out from what it reads) in one write transaction."""
        if callable(statements):
            prepare = statements
            await self.atomically(lambda connection: _execute(connection, prepare(connection)))
        else:
            await self.atomically(lambda connection: _execute(connection, statements))

    async def atomically(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """``job``'s result, once it ran in one write transaction that committed.

        The whole transaction is one trip to the connection's thread: each trip
        costs two thread wake-ups, and a fill records its blob in one. ``job`` runs
        on that thread, so it only calls the ``sqlite3`` connection it is given
        (and must not block on the loop). Cancelled, this stops waiting but the
        transaction still runs to its end: it is queued on the connection's thread
        before anything later, so it never overlaps another.
        """
        started = time.perf_counter()
        async with self._write_lock:
            connection = self.connection
            try:
                # aiosqlite runs each call on the connection's one thread, in order;
                # ``_execute`` queues any callable there (its public calls queue one statement).
                result = cast(T, await connection._execute(_atomically, connection._conn, job))
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):
                    raise StoreFull("no space left for the metadata database") from exc
                raise
        if self.observe:
            self.observe("write", time.perf_counter() - started)
        return result

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction that may read as it goes (GC decides and deletes in one).

        One connection serves every task, so transactions take turns.
        """
        async with self._write_lock:
            db = self.connection
            # Cancelled while BEGIN waits in the connection's queue, it still runs
            # after: roll it back then, or the connection stays in a transaction.
            begin = asyncio.ensure_future(db.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                await asyncio.wait([begin])
                if not begin.cancelled() and begin.exception() is None and db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
            try:
                yield db
                # Cancelled while COMMIT waits or runs, it still runs after: let it
                # end first, or the ROLLBACK below would run after it and fail,
                # hiding the cancellation (a stopping task would then go on).
                commit = asyncio.ensure_future(db.execute("COMMIT"))
                try:
                    await asyncio.shield(commit)
                except asyncio.CancelledError:
                    await asyncio.wait([commit])
                    raise
            except BaseException as exc:
                # SQLite may already have rolled back (a full disk does that).
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                    raise StoreFull("no space left for the metadata database") from exc
                raise
