"""The service's counters, written in Prometheus' text exposition format."""

from __future__ import annotations

import bisect
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bucket
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out += [f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    """Updated on the event loop only, so it needs no lock."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batches = Histogram(BATCH_BUCKETS)
        self.read_timeouts = 0  # connections closed without a whole request head in time

    def render(self, queue_depth: int, ready: bool, body_bytes: int, url_fetches: int = 0) -> str:
        lines = ["# HELP ofacls_requests_total HTTP requests answered, by endpoint and status.",
                 "# TYPE ofacls_requests_total counter"]
        lines += [f'ofacls_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        lines += ["# HELP ofacls_request_duration_seconds Time to answer a classify request.",
                  "# TYPE ofacls_request_duration_seconds histogram",
                  *self.latency.lines("ofacls_request_duration_seconds"),
                  "# HELP ofacls_batch_size Images per model call.",
                  "# TYPE ofacls_batch_size histogram",
                  *self.batches.lines("ofacls_batch_size"),
                  "# HELP ofacls_queue_depth Requests waiting for the model, the running batch included.",
                  "# TYPE ofacls_queue_depth gauge", f"ofacls_queue_depth {queue_depth}",
                  "# HELP ofacls_body_bytes Bytes of request bodies being received or decoded.",
                  "# TYPE ofacls_body_bytes gauge", f"ofacls_body_bytes {body_bytes}",
                  "# HELP ofacls_url_fetches URLs being fetched or waiting for a thread (--allow-urls).",
                  "# TYPE ofacls_url_fetches gauge", f"ofacls_url_fetches {url_fetches}",
                  "# HELP ofacls_read_timeouts_total Connections closed for a request head not sent in time.",
                  "# TYPE ofacls_read_timeouts_total counter",
                  f"ofacls_read_timeouts_total {self.read_timeouts}",
                  "# HELP ofacls_model_ready 1 once the model is loaded.",
                  "# TYPE ofacls_model_ready gauge", f"ofacls_model_ready {int(ready)}"]
        return "\n".join(lines) + "\n"
