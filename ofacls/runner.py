"""The one batch path, the CLI's and the library's: read and decode inputs on
worker threads, classify them in batches, hand out one Prediction per input in
input order.

Memory is bounded whatever the number of inputs: at most a window of
`2 x batch_size + workers` inputs is in flight, loaded or loading. Knows nothing
of terminals: `run` reports rows and progress through callbacks, so the caller
decides how both look.
"""

from __future__ import annotations

import dataclasses
import os
import queue as stdlib_queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from ofacls.errors import InputError, debug
from ofacls.prediction import Prediction
from ofacls.sources.expand import Source, read_source
from ofacls.sources.fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ofacls.calibration import Calibration
    from ofacls.classifier import Classifier
    from ofacls.labels import LabelTrie


@dataclass
class Stats:
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        """Images classified per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def reporter(self, on_row: Callable[[Prediction], None],
                 on_progress: Callable[[Stats], None] | None) -> Callable[[Prediction], None]:
        """What to call with each row, in order: hands it to `on_row`, counts it,
        then tells `on_progress`."""
        def report(pred: Prediction) -> None:
            on_row(pred)
            if pred.ok:
                self.done += 1
            else:
                self.failed += 1
            if on_progress:
                on_progress(self)
        return report


@dataclass(frozen=True)
class Item:
    """One input to classify: a `source` to read (file or URL), an `image` already
    in memory (image file bytes or a PIL image), or one known to have failed (`error`)."""

    name: str
    source: Source | None = None
    image: bytes | bytearray | memoryview | Image.Image | None = None
    error: str | None = None


def device_defaults(device_type: str) -> tuple[int, int]:
    """(batch size, loader threads) that suit a device. On CPU the model already
    uses every core and batches past a few images gain nothing; a GPU needs
    large batches, and many threads decoding images, to stay busy."""
    if device_type == "cpu":
        return 4, 4
    return 32, max(4, min(16, os.cpu_count() or 4))


@dataclass(frozen=True)
class Options:
    top_k: int = 5
    decode: str = "exact"
    batch_size: int = 4
    workers: int = 4
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES
    labels: LabelTrie | None = None  # None: the classifier's own
    calibration: Calibration | None = None  # gives each row its prediction set


def run(items: Iterable[Item], classifier: Classifier, options: Options,
        on_row: Callable[[Prediction], None],
        on_progress: Callable[[Stats], None] | None = None, total: int = 0) -> Stats:
    """Classify every item, calling `on_row` once per item, in input order, and
    `on_progress` after each; returns the counts."""
    stats = Stats(total=total)
    report = stats.reporter(on_row, on_progress)
    predictions = iter_predictions(items, classifier, options)
    try:
        for pred in predictions:
            report(pred)
    finally:
        predictions.close()  # on Ctrl-C or a failed write: stop the loaders now
    return stats


def iter_predictions(items: Iterable[Item], classifier: Classifier,
                     options: Options) -> Generator[Prediction, None, None]:
    """One Prediction per item, in input order, as each batch is done.

    Loading (file read or download, decode, resize) runs on `options.workers`
    threads while the model works on the previous batch; a bad input becomes
    its error Prediction and the rest go on. `items` is read lazily, a window
    ahead of the model."""

    def load(item: Item) -> torch.Tensor:
        if item.source is not None:
            data = read_source(item.source, timeout=options.timeout, max_bytes=options.max_bytes)
            return classifier.pixels(data)
        assert item.image is not None
        return classifier.pixels(item.image)

    pool = ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="ofacls-load")
    try:
        pending: list[tuple[Item, torch.Tensor | str]] = []
        ready = 0
        window = options.batch_size * 2 + options.workers
        for got in _prefetch(items, pool, load, window):
            if got is _IDLE:
                if not pending:
                    continue
                # the inputs have nothing more for now (a list still being written
                # to stdin): classify what is loaded instead of waiting for a full batch
                yield from _classify(pending, classifier, options)
                pending, ready = [], 0
                continue
            item, loaded = cast(tuple[Item, "torch.Tensor | str"], got)
            pending.append((item, loaded))
            if not isinstance(loaded, str):
                ready += 1
            if ready >= options.batch_size:
                yield from _classify(pending, classifier, options)
                pending, ready = [], 0
        yield from _classify(pending, classifier, options)
    finally:
        # on Ctrl-C, or an iterator closed early, do not wait for downloads in flight
        pool.shutdown(wait=False, cancel_futures=True)


_IDLE = object()  # _prefetch's word for "the inputs would block now"
_END = object()
_GRACE = 0.05  # seconds


class _Feeder:
    """`items` pulled on a thread of their own, one at a time and only when asked
    for (so the read-ahead stays the caller's window). `take(block)` is the next
    item, _END after the last, or, when `block` is false and none has come within
    a short grace, _IDLE (the item asked for is still the next one taken). An
    exception from the iterator is raised there."""

    def __init__(self, items: Iterable[Item]) -> None:
        self._items = items
        self._wanted = threading.Semaphore(0)
        self._buffer: stdlib_queue.SimpleQueue[object] = stdlib_queue.SimpleQueue()
        self._owed = False  # an item asked for and not yet taken
        self._closed = False
        threading.Thread(target=self._pull, name="ofacls-inputs", daemon=True).start()

    def _pull(self) -> None:
        try:
            it = iter(self._items)
            while True:
                self._wanted.acquire()
                if self._closed:
                    return
                got = next(it, _END)
                self._buffer.put(got)
                if got is _END:
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._buffer.put(_Raised(e))

    def take(self, block: bool) -> object:
        if not self._owed:
            self._wanted.release()
            self._owed = True
        try:
            # a short grace before "idle": a source that is merely slowish (a glob
            # walking a big folder) still fills whole batches
            got = self._buffer.get(timeout=None if block else _GRACE)
        except stdlib_queue.Empty:
            return _IDLE
        self._owed = False
        if isinstance(got, _Raised):
            raise got.error
        return got

    def close(self) -> None:
        self._closed = True
        self._wanted.release()  # a puller waiting to be asked stops


@dataclass(frozen=True)
class _Raised:
    error: BaseException


def _prefetch(items: Iterable[Item], pool: ThreadPoolExecutor,
              load: Callable[[Item], torch.Tensor], window: int
              ) -> Iterator[tuple[Item, torch.Tensor | str] | object]:
    """Yield (item, tensor or error message) in input order, loading ahead.

    A list or tuple is read directly. Any other iterable (a generator, a list
    arriving on stdin) is pulled on a thread, and when it has nothing ready
    while nothing else is loading, _IDLE is yielded before waiting for it, so
    the caller can finish a short batch instead of holding loaded images."""
    queue: list[tuple[Item, Future[torch.Tensor] | None]] = []
    take: Callable[[bool], object]
    feeder = None
    if isinstance(items, (list, tuple)):
        it = iter(items)
        take = lambda block: next(it, _END)  # noqa: E731  (a list never blocks)
    else:
        feeder = _Feeder(items)
        take = feeder.take
    try:
        exhausted = False
        while True:
            while not exhausted and len(queue) < window:
                got = take(False)
                if got is _IDLE:
                    if queue:
                        break
                    yield _IDLE
                    got = take(True)
                if got is _END:
                    exhausted = True
                    break
                item = cast(Item, got)
                fut = pool.submit(load, item) if item.error is None else None
                queue.append((item, fut))
            if not queue:
                return
            item, fut = queue.pop(0)
            if fut is None:
                yield item, item.error or "error"
                continue
            try:
                yield item, fut.result()
            except InputError as e:
                yield item, str(e)
            except Exception as e:  # the last-resort guard: one input never ends a batch
                if debug():
                    raise
                yield item, f"cannot load this input ({type(e).__name__}: {e})"
    finally:
        if feeder is not None:
            feeder.close()


def _classify(pending: list[tuple[Item, torch.Tensor | str]], classifier: Classifier,
              options: Options) -> Iterator[Prediction]:
    """The pending items' Predictions in order: the loaded ones classified as one batch."""
    good = [(item.name, x) for item, x in pending if not isinstance(x, str)]
    answers = iter(classifier.predict_pixels([x for _, x in good], [n for n, _ in good],
                                             top_k=options.top_k, decode=options.decode,
                                             labels=options.labels,
                                             calibration=options.calibration))
    for item, x in pending:
        pred = Prediction.failed(item.name, x) if isinstance(x, str) else next(answers)
        extra = item.source.extra if item.source is not None else None
        yield pred if extra is None else dataclasses.replace(pred, extra=extra)
