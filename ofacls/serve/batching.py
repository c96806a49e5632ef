"""Dynamic batching: requests that arrive close together share one model call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ofacls.prediction import Prediction

if TYPE_CHECKING:
    import torch

    from ofacls.calibration import Calibration
    from ofacls.labels import LabelTrie

# (pixels, names, top_k, decode, labels, calibration) -> one Prediction per image:
# Classifier.predict_pixels
PredictFn = Callable[..., list[Prediction]]


class QueueFull(Exception):
    """More requests are waiting for the model than the queue takes."""


@dataclass
class _Job:
    pixels: torch.Tensor
    name: str
    top_k: int
    decode: str
    future: asyncio.Future[Prediction]
    labels: LabelTrie | None = None  # None: the classifier's own
    calibration: Calibration | None = None
    arrived: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple[str, int, int]:
        """Jobs of one group run as one model call: same decoding, labels and sets."""
        return self.decode, id(self.labels), id(self.calibration)


class Batcher:
    """Collects requests into batches of up to `max_batch`, waiting at most
    `max_wait` seconds after a batch's first request for more, and runs them on
    one model thread. A batch is grouped by decode mode, label set and calibration,
    each group classified with its largest top_k, each answer cut to its own (the top
    labels do not depend on k)."""

    def __init__(self, predict: PredictFn, *, max_batch: int, max_wait: float, max_queue: int,
                 on_batch: Callable[[int], None] = lambda n: None) -> None:
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait
        self.max_queue, self.on_batch = max_queue, on_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="ofacls-model")
        self._task: asyncio.Task[None] | None = None
        # images taken off the queue for the batch being collected or run: they still
        # count against max_queue, and a stop waits for them
        self.taken = 0
        self.reserved = 0  # places held for images still being read and decoded

    @property
    def depth(self) -> int:
        """Images waiting for the model (the batch being collected or run included),
        or on their way to it."""
        return self._queue.qsize() + self.taken + self.reserved

    def reserve(self, n: int) -> None:
        """Hold `n` places for a request's images while they are fetched and decoded
        (QueueFull if they do not fit), so they count against max_queue from the
        start: else a backlog of slow decodes is admitted in full, and other clients
        wait behind it for a 503. `release` them just before `submit_all`."""
        self._room_for(n)
        self.reserved += n

    def release(self, n: int) -> None:
        self.reserved -= n

    def full(self) -> bool:
        return self.depth >= self.max_queue

    def _room_for(self, n: int) -> None:
        if self.depth + n > self.max_queue:
            raise QueueFull

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish every queued request, then stop the model thread."""
        while self.depth:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
        self._model_thread.shutdown(wait=True)

    async def submit(self, pixels: torch.Tensor, name: str, top_k: int, decode: str) -> Prediction:
        return await self.submit_all([(pixels, name)], top_k, decode)[0]

    def submit_all(self, images: Sequence[tuple[torch.Tensor, str]], top_k: int,
                   decode: str, labels: LabelTrie | None = None,
                   calibration: Calibration | None = None) -> list[asyncio.Future[Prediction]]:
        """Queue one request's (pixels, name) pairs all at once, or none (QueueFull when
        they do not all fit): a request is never half queued."""
        self._room_for(len(images))
        loop = asyncio.get_running_loop()
        jobs = [_Job(pixels, name, top_k, decode, loop.create_future(), labels, calibration)
                for pixels, name in images]
        for job in jobs:
            self._queue.put_nowait(job)
        return [job.future for job in jobs]

    async def _run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            self.taken = 1
            deadline = jobs[0].arrived + self.max_wait
            try:
                while len(jobs) < self.max_batch:
                    if not self._queue.empty():
                        jobs.append(self._queue.get_nowait())
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        try:
                            jobs.append(await asyncio.wait_for(self._queue.get(), left))
                        except asyncio.TimeoutError:
                            break
                    self.taken = len(jobs)
                await self._classify(jobs)
            finally:
                self.taken = 0

    async def _classify(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        jobs = [j for j in jobs if not j.future.done()]  # their clients left, or a stop cancelled them
        if not jobs:
            return
        for key in dict.fromkeys(j.group for j in jobs):  # in arrival order
            group = [j for j in jobs if j.group == key]
            self.on_batch(len(group))  # each group is a model call of its own
            first, top_k = group[0], max(j.top_k for j in group)
            try:
                preds = await loop.run_in_executor(self._model_thread, _call, self.predict,
                                                   [j.pixels for j in group], [j.name for j in group],
                                                   top_k, first.decode, first.labels, first.calibration)
            except Exception as e:  # the batch failed as a whole: each request hears why
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            for j, p in zip(group, preds):
                if not j.future.done():  # a client that left cancelled its future
                    j.future.set_result(cut(p, j.top_k))


def _call(predict: PredictFn, pixels: Sequence[Any], names: Sequence[str], top_k: int,
          decode: str, labels: LabelTrie | None, calibration: Calibration | None) -> list[Prediction]:
    return predict(pixels, names, top_k=top_k, decode=decode, labels=labels, calibration=calibration)


def cut(pred: Prediction, top_k: int) -> Prediction:
    """`pred` with only its first `top_k` labels."""
    if len(pred.top_k) <= top_k:
        return pred
    return Prediction(input=pred.input, label=pred.label, score=pred.score,
                      top_k=pred.top_k[:top_k], error=pred.error, indices=pred.indices[:top_k],
                      prediction_set=pred.prediction_set)
