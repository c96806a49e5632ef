"""Batch orchestration: read and decode inputs on worker threads, classify them
in batches, hand out rows in input order.

Knows nothing of terminals: progress goes through a callback, rows through
another, so the CLI decides how both look.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ofacls.errors import InputError
from ofacls.prediction import Prediction
from ofacls.sources import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, Source, read_source

if TYPE_CHECKING:
    import torch

    from ofacls.classifier import Classifier


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


@dataclass(frozen=True)
class Item:
    """One input to classify, or one already known to have failed (`error`)."""

    name: str
    source: Source | None = None
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


def run(items: Iterable[Item], classifier: Classifier, options: Options,
        on_row: Callable[[Prediction], None],
        on_progress: Callable[[Stats], None] | None = None, total: int = 0) -> Stats:
    """Classify every item, calling `on_row` once per item, in input order.

    Loading (file read or download, decode, resize) runs on `options.workers`
    threads while the model works on the previous batch; a bad input becomes an
    error row and the run goes on."""
    stats = Stats(total=total)

    def emit(pred: Prediction) -> None:
        on_row(pred)
        if pred.ok:
            stats.done += 1
        else:
            stats.failed += 1
        if on_progress:
            on_progress(stats)

    def load(item: Item) -> torch.Tensor:
        assert item.source is not None
        data = read_source(item.source, timeout=options.timeout, max_bytes=options.max_bytes)
        return classifier.pixels(data)

    pool = ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="ofacls-load")
    try:
        pending: list[tuple[Item, torch.Tensor | str]] = []
        ready = 0
        for item, loaded in _prefetch(items, pool, load, window=options.batch_size * 2 + options.workers):
            pending.append((item, loaded))
            if not isinstance(loaded, str):
                ready += 1
            if ready >= options.batch_size:
                _flush(pending, classifier, options, emit)
                pending, ready = [], 0
        _flush(pending, classifier, options, emit)
    finally:
        # on Ctrl-C do not wait for downloads in flight
        pool.shutdown(wait=False, cancel_futures=True)
    return stats


def _prefetch(items: Iterable[Item], pool: ThreadPoolExecutor,
              load: Callable[[Item], torch.Tensor], window: int
              ) -> Iterator[tuple[Item, torch.Tensor | str]]:
    """Yield (item, tensor or error message) in input order, loading ahead."""
    queue: list[tuple[Item, Future[torch.Tensor] | None]] = []
    it = iter(items)
    exhausted = False
    while True:
        while not exhausted and len(queue) < window:
            try:
                item = next(it)
            except StopIteration:
                exhausted = True
                break
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


def _flush(pending: list[tuple[Item, torch.Tensor | str]], classifier: Classifier,
           options: Options, emit: Callable[[Prediction], None]) -> None:
    import torch

    from ofacls.classifier import make_prediction

    good = [(item, x) for item, x in pending if not isinstance(x, str)]
    results: dict[int, list[tuple[str, float]] | str] = {}
    if good:
        batch = torch.stack([x for _, x in good])
        try:
            ranked = classifier.classify_pixels(batch, top_k=options.top_k, decode=options.decode)
            for (item, _), r in zip(good, ranked):
                results[id(item)] = r
        except (RuntimeError, ValueError) as e:
            # e.g. out of memory for the batch: give each image its own chance
            if len(good) == 1:
                results[id(good[0][0])] = f"classification failed: {e}".splitlines()[0]
            else:
                for item, pixels in good:
                    try:
                        results[id(item)] = classifier.classify_pixels(
                            pixels[None], top_k=options.top_k, decode=options.decode)[0]
                    except (RuntimeError, ValueError) as e1:
                        results[id(item)] = f"classification failed: {e1}".splitlines()[0]
    for item, x in pending:
        outcome = x if isinstance(x, str) else results[id(item)]
        emit(Prediction.failed(item.name, outcome) if isinstance(outcome, str)
             else make_prediction(item.name, outcome))
