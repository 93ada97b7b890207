"""Coalescing: the calls handed over while a batch is on its way go together in the next batch.

One round trip (one statement, one Lua call) and one commit for many concurrent callers instead of
one each, and no wait added: the first call of a batch goes out on the loop's next turn. The
events publisher (events.py) and the outbox's claims and `sent` records (storage/outbox.py) share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Runs `run` on the items submitted, in the order submitted, at most `max_batch` at a time.

    `run` returns one result per item, in order. Each caller's await ends with its own result, or
    with the error its batch met (the next batch is still tried); callers whose batch never ran
    because the flusher was cancelled are cancelled too."""

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], *, max_batch: int, name: str) -> None:
        self._run = run
        self._max_batch = max_batch
        self._name = name
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.calls = 0  # batches run (what a test or a benchmark reads)

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name=self._name)
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self._max_batch]
                self._pending = self._pending[self._max_batch:]
                try:
                    self.calls += 1
                    results = await self._run([item for item, _ in batch])
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flusher = None
            left, self._pending = self._pending, []
            for _, future in left:  # cancelled with calls still waiting: so are their callers
                future.cancel()
