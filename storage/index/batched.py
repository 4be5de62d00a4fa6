"""Group commit: writes that arrive while one transaction runs go together in the next.

Every write transaction costs a trip to the connection's thread and, with
``synchronous=FULL``, an fsync of the WAL. Fills that commit close together
(a prefetch runs several at a time) each record one blob row; here those
that arrive while a transaction is in flight share the next one. A write
that finds none in flight starts at once: batching never delays a lone one.
Each writer still returns only once its own row is committed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Generic, TypeVar

from storage.index.database import Database

Item = TypeVar("Item")
Result = TypeVar("Result")

# Writes one batch on the connection's thread, inside its transaction: a result per item, in order.
BatchJob = Callable[[sqlite3.Connection, list[Item]], list[Result]]


class Batched(Generic[Item, Result]):
    def __init__(self, db: Database, job: BatchJob[Item, Result]) -> None:
        self._db = db
        self._job = job
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, item: Item) -> Result:
        """``item``'s result once the transaction that wrote it committed; raises what it raised.

        Cancelled, this stops waiting; the item is written all the same."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None:
            # A task of its own: the batch must not depend on the first writer staying.
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._write([item for item, _ in batch])
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flusher = None
            for _, future in self._pending:  # only when cancelled: nothing runs them now
                future.cancel()
            self._pending = []

    async def _write(self, items: list[Item]) -> list[Result]:
        return await self._db.atomically(lambda connection: self._job(connection, items))

    async def settle(self) -> None:
        """Wait until every write queued so far has committed or failed."""
        while self._flusher is not None:
            await asyncio.wait([self._flusher])
