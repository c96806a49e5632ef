"""`ofacls serve` throughput and latency against `ofacls batch` on the same machine, same run.

usage: python benchmarks/serve_bench.py [--checkpoint DIR] [--images N] [--device cpu]

Without --checkpoint, the OFA-Large-shaped checkpoint of benchmarks/bench.py
(random weights, std 1.0) is built into .bench/ (about 2 GB, once). Reports:
`ofacls batch`'s images/s; the server's images/s at 1, 8 and 32 concurrent
clients (goal: at 32 clients, at least 0.9x batch's); p50/p99 latency at 1
client against one forward of `predict` (one image through classify_pixels).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
IMAGES = sorted(p for p in (ROOT / "tests" / "images").iterdir()
                if p.suffix in (".jpg", ".png") and p.name != "large.jpg")


def ofacls(*args: str) -> list[str]:
    return [sys.executable, "-m", "ofacls", *args]


def batch_figures(ckpt: Path, images: list[Path], device: str) -> tuple[float, float]:
    """(images/s of `ofacls batch`'s runner at its default batch size, steady state;
    seconds of one forward as `predict` runs it, best of 3), in this process."""
    import gc

    import torch
    from bench import per_image

    from ofacls import Classifier
    from ofacls.runner import device_defaults
    from ofacls.tuning import tune_process

    clf = Classifier.from_pretrained(ckpt, device=device)
    tune_process()
    rate = 1 / per_image(clf, "exact", device_defaults(clf.device.type)[0], images, repeats=1)
    x = torch.stack([clf.pixels(str(IMAGES[0]))])
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        clf.classify_pixels(x)
        best = min(best, time.perf_counter() - t)
    del clf
    gc.collect()
    return rate, best


def post(url: str, data: bytes) -> float:
    t = time.perf_counter()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=600) as r:
        json.loads(r.read())
    return time.perf_counter() - t


def serve_figures(ckpt: Path, images: list[Path], device: str) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(ofacls("serve", "--model", str(ckpt), "--device", device, "--port", str(port),
                                   "--quiet", "--max-queue", "1000"), stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("the server exited") from None
                time.sleep(0.5)
        bodies = [p.read_bytes() for p in images]
        url = base + "/v1/classify"
        post(url, bodies[0])  # warm-up
        out: dict[str, float] = {}
        for clients in (1, 8, 32):
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = list(pool.map(lambda b: post(url, b), bodies))
            out[f"serve_{clients}_ips"] = len(bodies) / (time.perf_counter() - t)
            if clients == 1:
                lat.sort()
                out["p50_s"] = statistics.median(lat)
                out["p99_s"] = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.checkpoint is None:
        from bench import build, large

        args.checkpoint = build("large-std1.0", large(1.0))
    images = (IMAGES * args.images)[:args.images]
    batch_ips, forward = batch_figures(args.checkpoint, images, args.device)
    r = {"batch_ips": batch_ips, "forward_s": forward, **serve_figures(args.checkpoint, images, args.device)}
    print(f"ofacls batch: {r['batch_ips']:.3f} images/s")
    for c in (1, 8, 32):
        print(f"serve, {c:2d} clients: {r[f'serve_{c}_ips']:.3f} images/s "
              f"({r[f'serve_{c}_ips'] / r['batch_ips']:.2f}x batch)")
    print(f"latency at 1 client: p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s; "
          f"predict's forward {r['forward_s']:.2f} s")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
