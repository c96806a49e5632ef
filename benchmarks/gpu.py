"""GPU throughput of ofacls: images/s for fp32, fp16 and bf16 at batch
1, 8 and 64, exact and beam decoding, through the batch runner (worker threads
decode images while the GPU works), on an OFA-Large-shaped checkpoint; then fp16
at batch 64 once more with cudnn.benchmark on.

usage: python benchmarks/gpu.py [--checkpoint DIR] [--images N] [--device cuda]
Prints one line per setting and the card's name; --json OUT saves the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import IMAGES, build, large  # noqa: E402


def throughput(clf, decode: str, batch_size: int, n: int, workers: int) -> float:
    from ofacls.runner import Item, Options, run
    from ofacls.sources.expand import Source

    paths = (IMAGES * (n // len(IMAGES) + 1))[:n]
    items = [Item(str(p), Source(str(p), str(p), False)) for p in paths]
    opts = Options(decode=decode, batch_size=batch_size, workers=workers)
    run(items[: batch_size * 2], clf, opts, lambda r: None)  # warm-up (cuDNN autotune, caches)
    torch.cuda.synchronize()
    t = time.perf_counter()
    stats = run(items, clf, opts, lambda r: None)
    torch.cuda.synchronize()
    assert stats.failed == 0
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from ofacls.classifier import Classifier

    ckpt = a.checkpoint or build("large-std1.0", large(1.0))
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    results = {}
    for precision in ("fp32", "fp16", "bf16"):
        clf = Classifier.from_pretrained(ckpt, device=a.device, dtype=precision)
        for decode in ("exact", "beam"):
            for bs in (1, 8, 64):
                n = a.images if bs > 1 else min(a.images, 32)
                ips = throughput(clf, decode, bs, n, a.workers)
                results[f"{precision}_{decode}_b{bs}"] = ips
                print(f"{precision:<5} {decode:<6} batch {bs:>3}: {ips:8.1f} images/s", flush=True)
        del clf
        torch.cuda.empty_cache()
    # Not yet measured, so not yet the default: cuDNN timing its convolution
    # algorithms for the trunk's fixed shapes instead of picking by heuristics.
    torch.backends.cudnn.benchmark = True
    clf = Classifier.from_pretrained(ckpt, device=a.device, dtype="fp16")
    ips = throughput(clf, "exact", 64, a.images, a.workers)
    results["fp16_exact_b64_cudnn_benchmark"] = ips
    print(f"fp16  exact  batch  64, cudnn.benchmark: {ips:8.1f} images/s", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
