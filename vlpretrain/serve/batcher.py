"""Concurrent text queries embedded together: a small asyncio micro-batcher in front of one model.

A request awaits :meth:`TextBatcher.encode`; a worker task takes whatever queries are waiting (up to
``max_batch``, after at most ``max_wait_s`` for more to arrive) and embeds them in one forward pass on
the model's own single thread, so the event loop never blocks and the model never runs two batches
at once. One text per forward costs nearly as much as 32 on a CPU, which is why batching pays.

Example:
    >>> batcher = TextBatcher(lambda texts: encode_queries(model, texts, None), executor)
    >>> vector = await batcher.encode("a smiling cat")      # (D,) float32
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["TextBatcher"]


class TextBatcher:
    """Embed texts from concurrent requests in batches with ``encode`` (texts -> (n, D) array) on ``executor``.

    Example:
        >>> batcher = TextBatcher(encode, ThreadPoolExecutor(1), max_batch=64, max_wait_s=0.002)
        >>> await asyncio.gather(batcher.encode("a cat"), batcher.encode("a dog"))  # one forward pass
    """

    def __init__(self, encode: Callable[[Sequence[str]], np.ndarray], executor: Executor, max_batch: int = 64,
                 max_wait_s: float = 0.002):
        self._encode, self._executor = encode, executor
        self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_s)
        self._queue: Optional[asyncio.Queue] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._worker: Optional[asyncio.Task] = None
        self.batches = 0  # forward passes run (tests and benchmarks read it)
        self.texts = 0

    def _start(self) -> asyncio.Queue:
        # The queue and worker belong to the running loop; a new loop (a test client without lifespan
        # runs each request on its own loop) gets its own.
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            # The worker is handed its queue: an old loop's worker never takes a new loop's queries.
            self._worker = loop.create_task(self._run(self._queue))
        return self._queue

    async def encode(self, text: str) -> np.ndarray:
        """The (D,) float32 embedding of ``text``, computed in a batch with other waiting queries."""
        future = asyncio.get_running_loop().create_future()
        await self._start().put((text, future))
        return await future

    async def _take_batch(self, queue: asyncio.Queue) -> list:
        batch = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
            except asyncio.CancelledError:  # close() while gathering: these queries were taken off the queue
                _fail(batch)
                raise
        return batch

    async def _run(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take_batch(queue)
            waiting = [(text, future) for text, future in batch if not future.cancelled()]
            if not waiting:
                continue
            try:
                vectors = await loop.run_in_executor(self._executor, self._encode, [t for t, _ in waiting])
            except asyncio.CancelledError:  # close() while this batch was embedded
                _fail(waiting)
                raise
            except Exception as e:  # every query of the batch gets the error; the worker keeps serving
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.texts += len(waiting)
            for (_, future), vector in zip(waiting, vectors):
                if not future.done():
                    future.set_result(vector)

    async def close(self) -> None:
        """Stop the worker (the app's shutdown calls it); queries still waiting fail with a RuntimeError."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, RuntimeError):
                pass
        self._worker = None
        queue, self._queue = self._queue, None
        while queue is not None and not queue.empty():
            _fail([queue.get_nowait()])


def _fail(waiting: list) -> None:
    """Fail the futures of ``waiting`` (text, future) pairs that no worker will answer."""
    for _, future in waiting:
        if not future.done():
            try:
                future.set_exception(RuntimeError("the text query was not embedded: the server is shutting down"))
            except RuntimeError:
                pass  # its event loop is closed: nobody awaits it any more
