"""`ofacls batch --engine ray` on one node against a local batch, in one run.

usage: python benchmarks/ray_bench.py [--checkpoint DIR] [--images N] [--noop-rows N] [--json OUT]

1. Per-image time of both engines on an OFA-Large-shaped checkpoint (built by
   benchmarks/bench.py into .bench/ when --checkpoint is not given), each as a
   real `ofacls batch` subprocess. Each engine runs twice, on N/2 and on N images
   (batches of 4), and the per-image time is the difference over N/2 images:
   start-up (Python, torch, the model, Ray's local instance and its actor) is
   paid by both runs and drops out. Goal: Ray's per-image time within 10% of
   the local one.
2. The Ray pipeline's own ceiling: rows/s through from_items -> the actor pool ->
   the driver's in-order writer, with actors that answer without a model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from ofacls.prediction import Prediction  # noqa: E402
from ofacls.ray import ClassifyBatch, Settings  # noqa: E402
from ofacls.runner import Item  # noqa: E402


class NoModel(ClassifyBatch):
    """Actors that answer every row at once: what is left is Ray's and the driver's cost."""

    def __init__(self, model: str = "", **settings: Any) -> None:
        self.settings = Settings(model=model, **settings)
        self.failed = None

    def _predict(self, items: list[Item]) -> list[Prediction]:
        return [Prediction(item.name, "tabby", 0.9, top_k=[("tabby", 0.9)], indices=[281])
                for item in items]


def batch_seconds(engine: str, ckpt: Path, images: list[Path], out: Path) -> float:
    """Wall time of one `ofacls batch` subprocess over `images`."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ofacls", "batch", *map(str, images), "-o", str(out), "-q",
           "--model", str(ckpt), "--engine", engine]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    return time.perf_counter() - t


def per_image(engine: str, ckpt: Path, images: list[Path], out: Path) -> dict[str, float]:
    half = images[: len(images) // 2]
    t_half = batch_seconds(engine, ckpt, half, out)
    t_all = batch_seconds(engine, ckpt, images, out)
    each = (t_all - t_half) / (len(images) - len(half))
    return {"per_image_s": each, "fixed_s": t_half - each * len(half), "wall_s": t_all}


def noop_rows_per_second(model: Path, rows: int, batch_size: int) -> float:
    import ray

    from ofacls.ray import connected, run_batch
    from ofacls.sources.expand import Source

    items = [Item(f"img{i}.png", Source(f"img{i}.png", f"/nonexistent/img{i}.png", False))
             for i in range(rows)]
    seen: list[Prediction] = []
    with connected(None):
        run_batch(items[:64], Settings(model=str(model), batch_size=batch_size), seen.append,
                  udf=NoModel)  # warm: workers started, modules imported
        seen.clear()
        t = time.perf_counter()
        run_batch(items, Settings(model=str(model), batch_size=batch_size), seen.append, udf=NoModel)
        elapsed = time.perf_counter() - t
    assert [p.input for p in seen] == [i.name for i in items] and not ray.is_initialized()
    return rows / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--noop-rows", type=int, default=20000)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    from bench import IMAGES, build, large
    from cli_helpers import tiny_model

    ckpt = a.checkpoint or build("large-std1.0", large(1.0))
    images = [IMAGES[i % len(IMAGES)] for i in range(a.images)]
    r: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "images": a.images}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.csv"
        r["local"] = per_image("local", ckpt, images, out)
        r["ray"] = per_image("ray", ckpt, images, out)
        tiny = tiny_model(Path(tmp) / "tiny")
        r["noop_rows_per_s"] = {str(b): noop_rows_per_second(tiny, a.noop_rows, b) for b in (4, 64)}
    r["ray_over_local"] = r["ray"]["per_image_s"] / r["local"]["per_image_s"]
    for engine in ("local", "ray"):
        e = r[engine]
        print(f"{engine:5s}  {e['per_image_s']:.2f} s/image  start-up {e['fixed_s']:.1f} s  "
              f"{a.images} images {e['wall_s']:.1f} s")
    print(f"ray / local per image: {r['ray_over_local']:.3f} (goal <= 1.10)")
    for b, rate in r["noop_rows_per_s"].items():
        print(f"no-model pipeline, --batch-size {b} ({4 * int(b)} rows per actor call): {rate:.0f} rows/s")
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
