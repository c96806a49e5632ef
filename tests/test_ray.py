"""`ofacls batch --engine ray` and ofacls.ray on real Ray clusters on this machine.

One `ray.cluster_utils.Cluster` serves the module: a head node with 4 logical
CPUs (more than the pipeline's stages, or a stage waits for one) and worker
nodes carrying an `ofacls` resource, so that the fault tests can place one
actor per worker node and then remove that node or kill that actor's process.
The rows of a Ray run must equal those of a local batch, and every input must
get exactly one row whatever fails mid-run. Slow inputs (URLs answered after a
delay) keep a run going long enough for a fault to land in the middle of it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from cli_helpers import assert_one_line_errors, cli_env, invoke, run_cli, small_image  # noqa: E402
from httpserver import HTTPTestServer  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from ofacls.formats import read_rows  # noqa: E402
from ofacls.prediction import Prediction  # noqa: E402
from ofacls.ray import (  # noqa: E402
    LOST,
    ClassifyBatch,
    ClusterError,
    InOrder,
    Settings,
    check_address,
    classify_dataset,
    run_batch,
    run_parts,
)
from ofacls.runner import Item  # noqa: E402
from ofacls.sources.expand import Source, TableColumns  # noqa: E402
from ofacls.sources.parts import plan  # noqa: E402

WORKER_NODES = 3


class RayCluster:
    """The module's cluster, with helpers to find and break its parts."""

    def __init__(self) -> None:
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
        self.workers: list = []
        self.ensure_workers(WORKER_NODES)

    @property
    def address(self) -> str:
        return self.cluster.address

    def ensure_workers(self, n: int) -> None:
        """At least `n` live worker nodes, each with room for one `ofacls` actor."""
        while len(self.workers) < n:
            self.workers.append(self.cluster.add_node(num_cpus=1, resources={"ofacls": 1}))
        self.cluster.wait_for_nodes()

    def remove_node_of(self, pid: int) -> None:
        """Remove the worker node whose raylet started process `pid`."""
        parent = _parent(pid)
        for node in self.workers:
            if node.all_processes["raylet"][0].process.pid == parent:
                self.cluster.remove_node(node)
                self.workers.remove(node)
                return
        raise AssertionError(f"process {pid} runs on none of the worker nodes")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def map_workers() -> list[int]:
    """The pids of Ray Data's actor processes (their title names the UDF)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and b"MapWorker(MapBatches(ClassifyBatch))" in \
                    Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:
            continue  # gone meanwhile
    return pids


def strike_once_rows_come(rows: list[Prediction], strike: Callable[[int], object]) -> list[int]:
    """On a thread: once two rows have come, `strike` the first actor process; the
    list it returns then holds that process's pid."""
    struck: list[int] = []

    def wait_and_strike() -> None:
        while len(rows) < 2:
            time.sleep(0.02)
        pid = map_workers()[0]
        strike(pid)
        struck.append(pid)

    threading.Thread(target=wait_and_strike, daemon=True).start()
    return struck


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    env = dict(os.environ)
    c = RayCluster()
    ray.init(address=c.address, include_dashboard=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.cluster.shutdown()
        os.environ.clear()
        os.environ.update(env)  # ray.init exports RAY_ADDRESS for child processes


@pytest.fixture(scope="module")
def pics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-pics")
    small_image(root / "a.png")
    for i, source in enumerate(("chelsea.png", "coffee.png", "rocket.jpg", "horse.png")):
        small_image(root / "folder" / f"{i}_{Path(source).stem}.png", source)
    (root / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    return root


def slow_route(server: HTTPTestServer, body: bytes, delay: float) -> Callable[[int], str]:
    """url(i): a distinct URL answering `body` as a PNG after `delay` seconds."""

    def handler(req: BaseHTTPRequestHandler) -> None:
        time.sleep(delay)
        try:
            req.send_response(200)
            req.send_header("Content-Type", "image/png")
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
        except OSError:
            pass  # the client was killed meanwhile: that is the test

    server.route("/slow.png", handler)
    return lambda i: server.url(f"/slow.png?{i}")


def url_items(url: Callable[[int], str], n: int) -> list[Item]:
    return [Item(f"img{i:02d}", Source(f"img{i:02d}", url(i), True)) for i in range(n)]


def assert_same_rows(local: list[dict], remote: list[dict]) -> None:
    """Same inputs in the same order, same labels and errors, scores within 1e-5."""
    assert [r["input"] for r in remote] == [r["input"] for r in local]
    for a, b in zip(local, remote):
        assert (b["label"], b["error"], b.get("index")) == (a["label"], a["error"], a.get("index"))
        assert [e["label"] for e in b["top_k"]] == [e["label"] for e in a["top_k"]]
        for x, y in zip(a["top_k"], b["top_k"]):
            assert y["score"] == pytest.approx(x["score"], abs=1e-5)


def test_rows_equal_a_local_batch_for_files_folders_urls_and_bad_inputs(
        cluster: RayCluster, model: Path, pics: Path, tmp_path: Path,
        http_server: HTTPTestServer) -> None:  # noqa: F811
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join([
        http_server.serve("/cat.png", (pics / "a.png").read_bytes()),
        http_server.serve("/coffee.png", (pics / "folder" / "1_coffee.png").read_bytes()),
        http_server.url("/missing.png"),
        http_server.serve("/page.html", b"<html></html>", content_type="text/html"),
    ]) + "\n")
    inputs = [str(pics / "a.png"), str(pics / "folder"), str(urls), str(pics / "no_such.png"),
              str(pics / "not_an_image.png")]
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    a = invoke(["batch", *inputs, "-o", str(local), "-k", "3"], model=model)
    b = invoke(["batch", *inputs, "-o", str(remote), "-k", "3", "--engine", "ray", "--actors", "2"],
               model=model)
    assert (a.exit_code, b.exit_code) == (1, 1), b.output
    rows = read_rows(remote)
    assert len(rows) == 1 + 4 + 4 + 2
    assert sum(r["error"] is None for r in rows) == 1 + 4 + 2
    assert_same_rows(read_rows(local), rows)
    summary = b.stderr.strip().splitlines()[-1]
    assert summary.startswith("ofacls: done 7, failed 4, skipped 0, ")


def test_library_dataset_classifies_paths_and_bytes(cluster: RayCluster, model: Path,
                                                    pics: Path) -> None:
    inputs: list[str | bytes] = [str(pics / "a.png"), (pics / "a.png").read_bytes(), b"junk"]
    rows = sorted(classify_dataset(inputs, model=str(model), top_k=2, device="cpu").take_all(),
                  key=lambda r: r["seq"])
    assert [r["input"] for r in rows] == [str(pics / "a.png"), "<bytes>", "<bytes>"]
    assert rows[0]["label"] == rows[1]["label"] and len(rows[0]["top_k"]) == 2
    assert rows[0]["top_k"][0]["index"] == rows[0]["index"]
    assert rows[2]["label"] is None and rows[2]["error"]


@pytest.mark.parametrize("fault", ["a node removed", "an actor killed"])
def test_a_fault_mid_run_leaves_every_input_exactly_once(
        cluster: RayCluster, model: Path, pics: Path, http_server: HTTPTestServer,  # noqa: F811
        fault: str) -> None:
    """A node (with its actors) removed, or one actor's process killed, once rows
    are coming: Ray reruns the lost work, and every input still gets one row."""
    cluster.ensure_workers(WORKER_NODES if fault == "a node removed" else 2)
    items = url_items(slow_route(http_server, (pics / "a.png").read_bytes(), 0.3), 24)
    rows: list[Prediction] = []
    struck = strike_once_rows_come(rows, cluster.remove_node_of if fault == "a node removed"
                                   else lambda pid: os.kill(pid, signal.SIGKILL))
    stats = run_batch(items, Settings(model=str(model), batch_size=1, workers=1), rows.append,
                      actors=2, resources={"ofacls": 1})
    assert struck, f"{fault} did not happen while the run was going"
    assert [r.input for r in rows] == [i.name for i in items]
    assert all(r.ok for r in rows) and (stats.done, stats.failed) == (24, 0)


def test_an_actor_killed_mid_run_of_a_table_read_on_the_cluster_leaves_every_row_once(
        cluster: RayCluster, model: Path, pics: Path, http_server: HTTPTestServer,  # noqa: F811
        tmp_path: Path) -> None:
    """A table read by the cluster's tasks (ofacls.sources.parts), a row group each:
    one actor's process killed once rows are coming, and every row still comes back
    once, in the table's order, with its kept column."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    cluster.ensure_workers(2)
    url = slow_route(http_server, (pics / "a.png").read_bytes(), 0.3)
    urls = [url(i) for i in range(24)]
    table = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "id": list(range(24))}), table, row_group_size=6)
    parts = list(plan([str(table)], lambda arg: iter(())))
    rows: list[Prediction] = []
    struck = strike_once_rows_come(rows, lambda pid: os.kill(pid, signal.SIGKILL))
    stats = run_parts(parts, Settings(model=str(model), batch_size=1, workers=1), rows.append,
                      columns=TableColumns(keep=("id",)), actors=2, resources={"ofacls": 1})
    assert struck and len(parts) == 4
    assert [r.input for r in rows] == urls
    assert [r.extra for r in rows] == [{"id": i} for i in range(24)]
    assert all(r.ok for r in rows) and (stats.done, stats.failed) == (24, 0)


def test_resume_after_an_interrupted_ray_run_finishes_every_input_once(
        cluster: RayCluster, model: Path, pics: Path, tmp_path: Path,
        http_server: HTTPTestServer) -> None:  # noqa: F811
    url = slow_route(http_server, (pics / "a.png").read_bytes(), 0.25)
    urls = tmp_path / "urls.txt"
    names = [url(i) for i in range(30)]
    urls.write_text("\n".join(names) + "\n")
    out = tmp_path / "out.csv"
    args = ["batch", str(urls), "-o", str(out), "--engine", "ray", "--ray-address", cluster.address,
            "--batch-size", "1", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", *args], env=cli_env(model),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:  # the header and two rows
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert_one_line_errors(stderr)
    first = [r["input"] for r in read_rows(out)]
    assert 2 <= len(first) < len(names) and first == names[:len(first)]

    again = invoke(args + ["--resume"], model=model)
    assert again.exit_code == 0, again.output
    assert [r["input"] for r in read_rows(out)] == names
    assert f"skipped {len(first)}," in again.stderr


def test_image_bytes_on_stdin_are_classified_as_locally_not_a_file_named_dash(
        cluster: RayCluster, model: Path, pics: Path, tmp_path: Path) -> None:
    """`cat img | ofacls batch - --engine ray`: the driver holds the bytes and sends
    them; a file named `-` in the current folder is not what gets classified."""
    (tmp_path / "-").write_bytes(b"this is text, not an image")
    photo = (pics / "folder" / "1_coffee.png").read_bytes()
    local = invoke(["batch", "-", "-o", str(tmp_path / "local.jsonl"), "-k", "3"], model=model,
                   input=photo)
    assert local.exit_code == 0, local.output
    proc = subprocess.run([sys.executable, "-m", "ofacls", "batch", "-", "-o", "ray.jsonl", "-k", "3",
                           "--engine", "ray", "--ray-address", cluster.address],
                          env=cli_env(model), cwd=tmp_path, input=photo, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "ray.jsonl")
    assert [(r["input"], r["error"]) for r in rows] == [("-", None)]
    assert_same_rows(read_rows(tmp_path / "local.jsonl"), rows)


def test_cache_dir_is_where_the_nodes_find_a_model_id(
        cluster: RayCluster, model: Path, pics: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model id that only the --cache-dir holds, offline: each actor resolves it
    there (a relative folder is the driver's, not a worker's current folder)."""
    # a layout resolve_model reads offline
    shutil.copytree(model, tmp_path / "models" / "someone" / "ofa_tiny")
    monkeypatch.chdir(tmp_path)
    args = ["batch", str(pics / "a.png"), "-o", "out.csv", "--engine", "ray", "--offline",
            "--model", "someone/ofa_tiny"]
    result = invoke([*args, "--cache-dir", "models"])
    assert result.exit_code == 0, result.output
    assert [r["error"] for r in read_rows(tmp_path / "out.csv")] == [None]

    missing = invoke([*args, "--overwrite"])  # the nodes' own cache does not have it
    assert missing.exit_code == 3
    assert_one_line_errors(missing.stderr)
    assert "someone/ofa_tiny is not in the local cache" in missing.stderr


def test_sigterm_mid_run_is_one_line_and_exit_143(
        cluster: RayCluster, model: Path, pics: Path, tmp_path: Path,
        http_server: HTTPTestServer) -> None:  # noqa: F811
    """As on the local engine: the rows written are complete, one line says how to
    resume, 128 + 15; no stack dump of Ray's."""
    url = slow_route(http_server, (pics / "a.png").read_bytes(), 0.5)
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(url(i) for i in range(40)) + "\n")
    out = tmp_path / "out.csv"
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", "batch", str(urls), "-o", str(out),
                             "--engine", "ray", "--ray-address", cluster.address, "--batch-size", "1",
                             "--workers", "1"], env=cli_env(model), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:  # the header and a row
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    *phases, line = stderr.splitlines()
    assert phases[0] == f"ofacls: joining the Ray cluster at {cluster.address}"
    assert re.fullmatch(r"ofacls: loading the model on \d+ replicas?", phases[1]) and len(phases) == 2
    assert line.startswith("ofacls: interrupted by SIGTERM; every row written is complete: "
                           "continue with `"), line
    rows = read_rows(out)
    assert 1 <= len(rows) < 40 and all(r["error"] is None for r in rows)


def test_rows_reach_out_as_each_batch_is_done_before_a_slow_url_answers(
        cluster: RayCluster, model: Path, pics: Path, tmp_path: Path,
        http_server: HTTPTestServer) -> None:  # noqa: F811
    """Four images, then a URL that answers only once their rows are in OUT: the
    rows of a finished batch are written while a later batch is still running,
    and stderr says what is happening, a line per phase, in order."""
    answer = threading.Event()
    body = (pics / "a.png").read_bytes()

    def held(req: BaseHTTPRequestHandler) -> None:
        answer.wait(timeout=180)
        req.send_response(200)
        req.send_header("Content-Type", "image/png")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    url = http_server.route("/held.png", held)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ofacls", "batch", str(pics / "folder"), url,
                             "-o", str(out), "--engine", "ray", "--ray-address", cluster.address,
                             "--actors", "1", "--batch-size", "4", "--timeout", "200"],
                            env=cli_env(model), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 4:
                break
            time.sleep(0.05)
        early = [r["input"] for r in read_rows(out)] if out.exists() else []
        assert not answer.is_set()
        answer.set()
        _, stderr = proc.communicate(timeout=120)
    finally:
        answer.set()
        if proc.poll() is None:
            proc.kill()
    assert early == [str(p) for p in sorted((pics / "folder").iterdir())], stderr
    assert proc.returncode == 0, stderr
    assert [r["input"] for r in read_rows(out)] == [*early, url]
    lines = stderr.splitlines()
    assert lines[:2] == [f"ofacls: joining the Ray cluster at {cluster.address}",
                         "ofacls: loading the model on 1 replica"], stderr
    assert lines[2].startswith("ofacls: done 5, failed 0, skipped 0, ") and len(lines) == 3, stderr


def test_an_actor_loads_one_batch_while_another_is_classified(cluster: RayCluster,
                                                              tmp_path: Path) -> None:
    """Two calls at once on one actor, as a local batch overlaps loading with the
    model's work: the second batch starts before the first is done."""
    log = tmp_path / "calls.log"

    class Slow(ClassifyBatch):
        def __init__(self, model: str = "", **settings: object) -> None:
            self.failed = None

        def _predict(self, items: list[Item]) -> list[Prediction]:
            with log.open("a") as f:
                f.write("start\n")
            # until the other batch has started too: if calls do not overlap, it starts
            # only after this one ends, and the order below tells
            deadline = time.monotonic() + 60
            while log.read_text().count("start") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            with log.open("a") as f:
                f.write("end\n")
            return [Prediction(i.name, "tabby", 0.9, top_k=[("tabby", 0.9)]) for i in items]

    items = [Item(f"img{i}", Source(f"img{i}", f"/nowhere/img{i}.png", False)) for i in range(4)]
    rows: list[Prediction] = []
    run_batch(items, Settings(model="unused", batch_size=2), rows.append, actors=1, udf=Slow)
    assert [r.input for r in rows] == [i.name for i in items]
    assert log.read_text().split() == ["start", "start", "end", "end"]


def test_an_address_where_no_cluster_listens_is_one_line_and_exit_3_at_once(
        model: Path, pics: Path, tmp_path: Path) -> None:
    port = _free_port()
    out = tmp_path / "o.csv"
    start = time.monotonic()
    result = run_cli(["batch", str(pics / "a.png"), "-o", str(out), "--engine", "ray",
                      "--ray-address", f"127.0.0.1:{port}"], env=cli_env(model), timeout=60)
    took = time.monotonic() - start
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"ofacls: cannot reach a Ray cluster at 127.0.0.1:{port} (is 'ray start --head' running there?)"]
    assert took < 20
    assert not out.exists()


def test_check_address_probes_host_and_port_and_leaves_rays_own_names_to_ray() -> None:
    port = _free_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"[::1]:{port}"):
        with pytest.raises(ClusterError, match="cannot reach a Ray cluster at "):
            check_address(address, timeout=2)
    for name in (None, "", "auto", "local"):
        check_address(name)  # nothing to probe: ray.init knows these


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_model_that_fails_on_the_nodes_exits_3_with_one_line(
        cluster: RayCluster, pics: Path, tmp_path: Path) -> None:
    result = invoke(["batch", str(pics / "a.png"), "-o", str(tmp_path / "o.csv"), "--engine", "ray",
                     "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 3
    assert_one_line_errors(result.stderr)
    assert "no-model" in result.stderr
    assert not (tmp_path / "o.csv").exists()


def test_without_ray_installed_it_says_how_to_install_and_exits_2(model: Path, pics: Path,
                                                                  tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = cli_env(model, PYTHONPATH=str(shadow.parent))
    result = run_cli(["batch", str(pics / "a.png"), "-o", str(tmp_path / "o.csv"), "--engine", "ray"],
                     env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ofacls: --engine ray needs Ray Data: pip install 'ofacls[ray]'"]
    assert not (tmp_path / "o.csv").exists()
    local = run_cli(["batch", str(pics / "a.png"), "-o", str(tmp_path / "o.csv")], env=env)
    assert local.returncode == 0, local.stderr


def test_importing_ofacls_and_its_cli_leaves_ray_unloaded() -> None:
    code = "import sys, ofacls, ofacls.cli, ofacls.ray; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_in_order_hands_out_each_input_once_in_order() -> None:
    items = [Item("a", Source("a", "a", False)), Item("b", error="no such file"),
             Item("c", Source("c", "c", False)), Item("d", Source("d", "d", False))]
    out: list[Prediction] = []
    order = InOrder(items, out.append)
    order.add(2, Prediction("c", "x", 0.5))
    assert out == []
    order.add(0, Prediction("a", "y", 0.5))
    order.add(0, Prediction("a", "again", 0.5))  # a recomputed block's copy
    order.add(2, Prediction("c", "again", 0.5))
    assert [(p.input, p.label, p.error) for p in out] == [
        ("a", "y", None), ("b", None, "no such file"), ("c", "x", None)]
    order.finish()  # "d" never came back
    assert [(p.input, p.error) for p in out][3:] == [("d", LOST)]
