"""A Parquet table of URL rows, classified exactly once through a kill -9, with flat memory.

usage: python benchmarks/scale_bench.py [--rows 2000 20000] [--kill-at 0.4] [--ray] [--json OUT]

For each row count N (ascending), in one run:

1. A table of N URL rows (`url`, `id`) served from 127.0.0.1, 1% of them hostile in
   turn: a 404, a connection cut mid-answer, a body that trickles past --timeout,
   a page that is not an image. A tiny model is built here (tests/cli_helpers).
2. `ofacls batch TABLE -o DIR/ --shard-rows R --keep-cols id` in a subprocess,
   killed with SIGKILL once a share (--kill-at) of the parts exist, then run
   again with `--resume`. Checked: every id has exactly one row across the parts,
   the hostile ones as error rows and no other row failed.
3. The resumed run's peak RSS (its own, from wait4), so the sizes can be compared:
   goal, at the largest N within 15% of the smallest N's.

With `--ray` the table sits in an S3 bucket (moto's server on 127.0.0.1, started
here) and each run is `--engine ray` on a local Ray instance: the table is read by
the cluster's tasks, the kill -9 takes the driver's whole process group (the Ray
instance it started with it), and the peak RSS is the driver's.

Then the input pipeline's own rate apart from the model: fetch + vet + decode +
resize of good rows on as many threads as `batch` uses on a CPU, reported in
rows/s per core beside img2dataset's published figure (1,350 images/s on one
16-core machine: about 84 per core, with resizing, downloading from the web).

The model here is the tests' tiny one choosing between two labels: the point is
the data path, not the model. Numbers are ratios within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

IMG2DATASET_PER_CORE = 1350 / 16  # img2dataset's README: 1,350 images/s on a 16-core machine


def hostile_server(n_images: int) -> Any:
    """The images at /i/<k>.jpg (k < n_images, small JPEGs of the test photos), and
    the four hostile routes."""
    from httpserver import HTTPTestServer
    from PIL import Image

    server = HTTPTestServer()
    photos = sorted((ROOT / "tests" / "images").glob("*.png"))
    for k in range(n_images):
        with Image.open(photos[k % len(photos)]) as im:
            buf = io.BytesIO()
            im.convert("RGB").resize((64 + k % 32, 48), Image.BICUBIC).save(buf, "JPEG", quality=85)
        server.serve(f"/i/{k}.jpg", buf.getvalue(), content_type="image/jpeg")
    server.serve("/missing", b"", status=404)
    server.raw("/cut", b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n\xff\xd8\xff")
    server.trickle("/slow")
    server.serve("/page", b"<html>not an image</html>", content_type="text/html")
    return server.__enter__()


HOSTILE = ("/missing", "/cut", "/slow", "/page")


def write_table(path: Path, server: Any, rows: int, n_images: int) -> set[int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls, bad = [], set()
    for i in range(rows):
        if i % 100 == 50:
            urls.append(server.url(HOSTILE[(i // 100) % len(HOSTILE)]))
            bad.add(i)
        else:
            urls.append(server.url(f"/i/{i % n_images}.jpg"))
    pq.write_table(pa.table({"url": urls, "id": list(range(rows))}), path, row_group_size=10_000)
    return bad


def run_batch(args: list[str], env: dict[str, str], kill_when: Path | None = None,
              kill_parts: int = 0) -> tuple[int, int, float]:
    """(exit code, peak RSS in bytes, seconds) of one `ofacls batch` subprocess;
    killed with SIGKILL (its whole process group) once `kill_parts` parts exist in
    `kill_when`."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", "batch", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    if kill_when is not None:
        while proc.poll() is None and len(list(kill_when.glob("part-*"))) < kill_parts:
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1, -signal.SIGKILL):
        raise SystemExit(f"batch failed ({code}): {err[-2000:]}")
    return code, usage.ru_maxrss * 1024, time.monotonic() - start


def bucket(tables: list[Path]) -> tuple[Any, dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with bucket `bench` holding `tables`; the
    server and the environment that points s3fs at it."""
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    os.environ.update(env)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bench")
    for table in tables:
        fs.put_file(str(table), f"bench/{table.name}")
    return server, env


def check_once(folder: Path, rows: int, bad: set[int]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    ids: list[int] = []
    failed: set[int] = set()
    for part in sorted(folder.glob("part-*.parquet")):
        t = pq.read_table(part, columns=["id", "error"])
        for i, e in zip(t.column("id").to_pylist(), t.column("error").to_pylist()):
            ids.append(int(i))
            if e is not None:
                failed.add(int(i))
    once = len(ids) == rows and set(ids) == set(range(rows))
    return {"rows_written": len(ids), "exactly_once": once, "hostile_failed": failed == bad,
            "unexpected_failures": sorted(failed - bad)[:10]}


def pipeline_rate(server: Any, n: int, workers: int, n_images: int) -> float:
    """Good rows/s through fetch + vet + decode + resize on `workers` threads."""
    from ofacls.images import load_pixels
    from ofacls.sources import Source, read_source

    def one(k: int) -> None:
        url = server.url(f"/i/{k % n_images}.jpg")
        load_pixels(read_source(Source(url, url, True), timeout=5), 480)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(min(100, n))))  # warm: imports, connections
        start = time.monotonic()
        list(pool.map(one, range(n)))
    return n / (time.monotonic() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--shard-rows", type=int, default=1000)
    ap.add_argument("--kill-at", type=float, default=0.4, help="share of the parts written before kill -9")
    ap.add_argument("--pipeline-rows", type=int, default=2000)
    ap.add_argument("--ray", action="store_true",
                    help="the table in a moto S3 bucket, on a local Ray instance")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from cli_helpers import cli_env, tiny_model

    cores = len(os.sched_getaffinity(0))
    report: dict[str, Any] = {"cores": cores, "engine": "ray, table in S3 (moto)" if a.ray else "local",
                              "runs": []}
    with tempfile.TemporaryDirectory(prefix="ofacls-scale-") as tmp:
        root = Path(tmp)
        model = tiny_model(root / "model")
        n_images = min(1000, max(a.rows))  # distinct images served; rows beyond reuse them
        server = hostile_server(n_images)
        store = None
        try:
            env = cli_env(model)
            env.pop("OMP_NUM_THREADS", None)
            tables = {rows: root / f"t{rows}.parquet" for rows in sorted(a.rows)}
            bads = {rows: write_table(table, server, rows, n_images) for rows, table in tables.items()}
            if a.ray:
                store, s3_env = bucket(list(tables.values()))
                env.update(s3_env)
            for rows in sorted(a.rows):
                table, bad = tables[rows], bads[rows]
                out = root / f"out{rows}"
                where = ([f"s3://bench/{table.name}", "--engine", "ray", "--actors", "1"] if a.ray
                         else [str(table)])
                args = [*where, "-o", f"{out}/", "--shard-rows", str(a.shard_rows), "--keep-cols", "id",
                        "--labels", "tench,goldfish", "-k", "1", "-b", "32", "--timeout", "2", "-q"]
                parts = max(1, int(rows / a.shard_rows * a.kill_at))
                _, _, killed_after = run_batch(args, env, kill_when=out, kill_parts=parts)
                code, rss, seconds = run_batch([*args, "--resume"], env)
                result = {"rows": rows, "killed_after_s": round(killed_after, 1),
                          "parts_before_kill": parts, "resume_exit": code, "resume_s": round(seconds, 1),
                          "resume_peak_rss_mb": round(rss / 2**20, 1), **check_once(out, rows, bad)}
                report["runs"].append(result)
                print(json.dumps(result), flush=True)
            small, large = report["runs"][0], report["runs"][-1]
            report["rss_ratio_largest_to_smallest"] = round(
                large["resume_peak_rss_mb"] / small["resume_peak_rss_mb"], 3)
            workers = 4  # batch's loader threads on a CPU (runner.device_defaults)
            rate = pipeline_rate(server, a.pipeline_rows, workers, n_images)
            report["pipeline"] = {"rows_per_s": round(rate, 1), "threads": workers,
                                  "rows_per_s_per_core": round(rate / cores, 1),
                                  "img2dataset_rows_per_s_per_core": round(IMG2DATASET_PER_CORE, 1)}
        finally:
            server.__exit__(None, None, None)
            if store is not None:
                store.stop()
    print(json.dumps(report, indent=1))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
