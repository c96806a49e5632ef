"""Tables, WebDataset shards and object stores as inputs: rows named as the table or
shard names them, kept columns carried into every format, bad rows and broken
shards as error rows, and an S3 bucket served by moto on 127.0.0.1."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import cli_env, invoke, one_torch_thread, run_cli, small_image  # noqa: F401

from ofacls.sources.expand import BadInput, Source, TableColumns, expand_inputs
from ofacls.sources.shards import expand_braces

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pics/ with 6 images, and tables naming them by paths relative to the tables."""
    root = tmp_path_factory.mktemp("tables")
    sources = ["chelsea.png", "coffee.png", "horse.png", "rocket.jpg", "camera.png", "astronaut.png"]
    names = [f"pics/{i}.png" for i in range(len(sources))]
    for name, source in zip(names, sources):
        small_image(root / name, source)
    ids, captions = list(range(100, 106)), [f"caption, {i}" for i in range(6)]
    pq.write_table(pa.table({"id": ids, "url": names, "caption": captions}), root / "t.parquet",
                   row_group_size=4)
    with (root / "t.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "caption"])
        w.writerows(zip(ids, names, captions))
    with (root / "t.tsv").open("w", encoding="utf-8") as f:
        f.write("image\tid\n" + "".join(f"{n}\t{i}\n" for n, i in zip(names, ids)))
    with gzip.open(root / "t.jsonl.gz", "wt", encoding="utf-8") as f:
        for n, i, c in zip(names, ids, captions):
            f.write(json.dumps({"input": n, "id": i, "caption": c}) + "\n")
    return root


def shard(path: Path, images: list[Path], start: int) -> Path:
    """A WebDataset shard: per sample a .png and a .json member."""
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images, start):
            tar.add(image, arcname=f"{i:06d}.png")
            meta = json.dumps({"sample": i}).encode()
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    return path


# --- tables -------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["t.parquet", "t.csv", "t.tsv", "t.jsonl.gz"])
def test_a_table_names_one_input_per_row(data: Path, table: str) -> None:
    got = list(expand_inputs([str(data / table)], columns=TableColumns(keep=("id",))))
    assert [s.name for s in got] == [f"pics/{i}.png" for i in range(6)]
    assert all(isinstance(s, Source) and Path(s.location) == data / s.name for s in got)
    assert [str(s.extra["id"]) for s in got if isinstance(s, Source) and s.extra] == [
        str(i) for i in range(100, 106)]


def test_kept_columns_reach_every_output_format(data: Path, model: Path, tmp_path: Path) -> None:
    for ext in ("csv", "tsv", "jsonl", "json", "parquet"):
        out = tmp_path / f"out.{ext}"
        result = invoke(["batch", str(data / "t.parquet"), "-o", str(out), "-q", "-k", "1",
                         "--keep-cols", "id,caption"], model=model)
        assert result.exit_code == 0, result.stderr
        if ext in ("csv", "tsv"):
            with out.open(newline="", encoding="utf-8") as f:
                table = list(csv.reader(f, delimiter="," if ext == "csv" else "\t"))
            assert table[0][-2:] == ["id", "caption"]  # after ours
            kept = [(r[-2], r[-1]) for r in table[1:]]
        elif ext == "parquet":
            t = pq.read_table(out)
            kept = list(zip(map(str, t.column("id").to_pylist()), t.column("caption").to_pylist()))
        else:
            written = json.loads(out.read_text()) if ext == "json" else rows(out.read_text())
            kept = [(str(r["id"]), r["caption"]) for r in written]
        assert kept == [(str(100 + i), f"caption, {i}") for i in range(6)], ext


def test_input_column_is_chosen_or_named(data: Path, tmp_path: Path) -> None:
    table = tmp_path / "x.csv"
    table.write_text("name,where\na,pics/0.png\n", encoding="utf-8")
    (got,) = expand_inputs([str(table)])
    assert isinstance(got, BadInput) and "has none of the columns url, path, input, image, file" in got.error
    assert "--input-col" in got.error
    (got,) = expand_inputs([str(table)], columns=TableColumns(input_col="where"))
    assert isinstance(got, Source) and got.location == str(tmp_path / "pics/0.png")
    (got,) = expand_inputs([str(table)], columns=TableColumns(input_col="where", keep=("nope",)))
    assert isinstance(got, BadInput) and "has no column 'nope' to keep" in got.error


def test_bad_rows_are_error_rows_and_the_table_goes_on(tmp_path: Path, data: Path) -> None:
    table = tmp_path / "t.jsonl"
    first, last = json.dumps({"url": str(data / "pics/0.png")}), json.dumps({"url": str(data / "pics/1.png")})
    table.write_text(f'{first}\n{{"url": ""}}\nnot json\n[1]\n{last}\n', encoding="utf-8")
    got = list(expand_inputs([str(table)]))
    assert [type(g).__name__ for g in got] == ["Source", "BadInput", "BadInput", "BadInput", "Source"]
    assert [g.error for g in got if isinstance(g, BadInput)] == [
        "row 2 has no url", "line 3 is not JSON", "line 4 is not a JSON object"]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    (got,) = expand_inputs([str(broken)])
    assert isinstance(got, BadInput) and got.error.startswith("cannot read this table")


def test_a_kept_column_that_clashes_with_ours_is_a_usage_error(data: Path, model: Path) -> None:
    result = invoke(["batch", str(data / "t.csv"), "-o", "-", "--keep-cols", "id,label"], model=model)
    assert result.exit_code == 2 and "'label': ofacls' own rows have that column" in result.stderr


def test_a_table_is_read_as_a_stream(tmp_path: Path) -> None:
    """The first rows come before the rest of the table is read: 200k rows of
    Parquet yield their first input after reading one batch of a row group."""
    n = 200_000
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"url": [f"https://example.test/{i}.jpg" for i in range(n)]}), path,
                   row_group_size=50_000)
    stream = expand_inputs([str(path)])
    first = next(stream)
    assert isinstance(first, Source) and first.name == "https://example.test/0.jpg"
    import tracemalloc

    tracemalloc.start()
    count = 1 + sum(1 for _ in stream)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == n
    assert peak < 40 * 2**20, peak  # a batch at a time, not 200k Sources at once


# --- shards ---------------------------------------------------------------------------------------


def test_brace_patterns_expand_as_webdataset_writes_them() -> None:
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar",
                                                  "b-10.tar"]


def test_shards_stream_their_image_members(data: Path, model: Path, tmp_path: Path) -> None:
    pics = sorted((data / "pics").glob("*.png"))
    shard(tmp_path / "00000.tar", pics[:3], 0)
    shard(tmp_path / "00001.tar", pics[3:], 3)
    good = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(good[: len(good) // 2])  # cut off mid-member
    out = tmp_path / "out.jsonl"
    result = invoke(["batch", str(tmp_path / "{00000..00003}.tar"), "-o", str(out), "-k", "1"], model=model)
    assert result.exit_code == 1  # the broken and the missing shard
    written = rows(out.read_text())
    names = [r["input"] for r in written]
    assert names[:6] == [f"{tmp_path}/0000{i // 3}.tar/{i:06d}.png" for i in range(6)]
    assert all(r["error"] is None for r in written[:6])
    # the same answers as the images themselves
    direct = rows(invoke(["predict", "--json", "-k", "1", *map(str, pics)], model=model).stdout)
    assert [r["label"] for r in written[:6]] == [r["label"] for r in direct]
    # the cut shard: its whole members, then an error row saying how far it got
    cut = [r for r in written[6:] if r["input"].startswith(f"{tmp_path}/00002.tar/")]
    assert cut and all(r["error"] is None for r in cut)
    errors = {r["input"]: r["error"] for r in written[6:] if r["error"]}
    members = f"{len(cut)} member{'s' if len(cut) > 1 else ''}"
    assert errors.pop(f"{tmp_path}/00002.tar") == (
        f"not a readable tar shard after {members} (unexpected end of data)")
    assert errors == {f"{tmp_path}/00003.tar": "no such file or directory"}


# --- an S3 bucket ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(data: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1, with bucket `bkt` holding the images under
    photos/, a Parquet table of their keys (relative), a list and a shard; yields
    the environment that points s3fs at it."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL")}
    os.environ.update(env)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    # moto keeps its buckets per process, not per server: a second set-up in this
    # process (its tests split between two xdist groups) starts from an empty store
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"),
                           timeout=30).close()
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bkt")
    pics = sorted((data / "pics").glob("*.png"))
    for p in pics:
        fs.pipe(f"bkt/photos/{p.name}", p.read_bytes())
    fs.pipe("bkt/photos/notes.txt.bak", b"not an image")
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": [f"photos/{p.name}" for p in pics] + ["photos/missing.png"],
                             "id": list(range(len(pics) + 1))}), buf)
    fs.pipe("bkt/table.parquet", buf.getvalue())
    fs.pipe("bkt/list.txt", "".join(f"s3://bkt/photos/{p.name}\n" for p in pics[:2]).encode())
    fs.pipe("bkt/shards/000.tar", shard(data / "s3shard.tar", pics[:2], 0).read_bytes())
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_every_input_kind_in_a_bucket(s3: dict[str, str], model: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = run_cli(["batch", "s3://bkt/photos/", "s3://bkt/table.parquet", "s3://bkt/list.txt",
                    "s3://bkt/shards/{000..000}.tar", "s3://bkt/photos/*.png", "s3://bkt/nope.png",
                    "-o", str(out), "-k", "1", "--keep-cols", "id"], env=cli_env(model, **s3))
    assert proc.returncode == 1, proc.stderr  # the missing objects
    written = rows(out.read_text())
    by_input: dict[str, list[dict]] = {}
    for r in written:
        by_input.setdefault(r["input"], []).append(r)
    pics = [f"{i}.png" for i in range(6)]
    assert [r["input"] for r in written[:6]] == [f"s3://bkt/photos/{p}" for p in pics]
    assert [r["input"] for r in written[6:13]] == [f"photos/{p}" for p in pics] + ["photos/missing.png"]
    assert [r["id"] for r in written[6:13]] == list(range(7))
    assert written[12]["error"] == "no such object"
    assert [r["input"] for r in written[13:15]] == [f"s3://bkt/photos/{p}" for p in pics[:2]]
    assert [r["input"] for r in written[15:17]] == [f"s3://bkt/shards/000.tar/{i:06d}.png" for i in range(2)]
    assert [r["input"] for r in written[17:23]] == [f"s3://bkt/photos/{p}" for p in pics]
    assert written[23] == {**written[23], "input": "s3://bkt/nope.png", "label": None}
    assert len(written) == 24 and all(r["error"] is None for r in written if "missing" not in r["input"]
                                      and "nope" not in r["input"])
    # the answers are the local images' answers
    local = rows(invoke(["predict", "--json", "-k", "1", *map(str, sorted((data / "pics").glob("*.png")))],
                        model=model).stdout)
    assert [r["label"] for r in written[:6]] == [r["label"] for r in local]


def test_an_object_over_the_size_limit_is_refused_before_it_is_read(s3: dict[str, str], model: Path) -> None:
    proc = run_cli(["predict", "s3://bkt/photos/0.png", "--max-download", "100B"], env=cli_env(model, **s3))
    assert proc.returncode == 1 and "over the 100 bytes limit" in proc.stderr, proc.stderr


# --- sharded outputs --------------------------------------------------------------------------------


def part_rows(folder: Path) -> list[dict]:
    out: list[dict] = []
    for part in sorted(folder.glob("part-*.jsonl")):
        out += rows(part.read_text())
    return out


@pytest.fixture(scope="module")
def many(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 120 small images."""
    import shutil

    folder = tmp_path_factory.mktemp("many")
    pics = sorted((data / "pics").glob("*.png"))
    for i in range(120):
        shutil.copyfile(pics[i % len(pics)], folder / f"{i:04d}.png")
    return folder


def test_a_folder_out_is_written_in_whole_parts(many: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(["batch", str(many), "-o", f"{out}/", "-f", "jsonl", "--shard-rows", "50", "-k", "1"],
                    model=model)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip().endswith(f"-> {out}/")
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-0000{i}.jsonl" for i in range(3)]
    assert [len(rows(p.read_text())) for p in sorted(out.glob("part-*"))] == [50, 50, 20]
    assert [r["input"] for r in part_rows(out)] == [f"{many}/{i:04d}.png" for i in range(120)]
    again = invoke(["batch", str(many), "-o", f"{out}/", "-f", "jsonl"], model=model)
    assert again.exit_code == 2 and "already holds 3 part(s)" in again.stderr


def test_kill_9_then_resume_gives_every_input_exactly_once(many: Path, model: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = [sys.executable, "-m", "ofacls", "batch", str(many), "-o", f"{out}/", "-f", "jsonl",
            "--shard-rows", "8", "-k", "1", "-b", "1", "-q"]
    proc = subprocess.Popen(args, env=cli_env(model), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("part-00002.jsonl")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("part-*.jsonl")))
    # 15 parts in all: the kill comes with 96 images to go, seconds of work on any machine
    assert 3 <= done_before < 15, "the kill came too late to test anything"
    resumed = subprocess.run([*args, "--resume"], env=cli_env(model), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.glob(".part-*"))  # the cut-off part is gone
    names = [r["input"] for r in part_rows(out)]
    assert sorted(names) == [f"{many}/{i:04d}.png" for i in range(120)]  # each once
    assert all(r["error"] is None for r in part_rows(out))


def test_parts_in_a_bucket(s3: dict[str, str], model: Path, tmp_path: Path) -> None:
    import fsspec

    proc = run_cli(["batch", "s3://bkt/photos/", "-o", "s3://bkt/out/", "--shard-rows", "4", "-k", "1"],
                   env=cli_env(model, **s3))
    assert proc.returncode == 0, proc.stderr
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    parts = sorted(fs.find("bkt/out/"))
    assert parts == ["bkt/out/part-00000.parquet", "bkt/out/part-00001.parquet"]
    tables = [pq.read_table(io.BytesIO(fs.cat(p))) for p in parts]
    assert [t.num_rows for t in tables] == [4, 2]
    resumed = run_cli(["batch", "s3://bkt/photos/", "-o", "s3://bkt/out/", "--resume", "-k", "1"],
                      env=cli_env(model, **s3))
    assert resumed.returncode == 0 and "skipped 6" in resumed.stderr, resumed.stderr
    single = run_cli(["batch", "s3://bkt/photos/", "-o", "s3://bkt/out.csv"], env=cli_env(model, **s3))
    assert single.returncode == 2 and "a folder of parts: end it with /" in single.stderr


def test_a_url_named_in_many_rows_keeps_a_row_per_naming_on_resume(data: Path, model: Path,
                                                                   tmp_path: Path) -> None:
    table = tmp_path / "dups.csv"
    table.write_text("url,id\n" + "".join(f"{data / 'pics' / f'{i % 2}.png'},{i}\n" for i in range(6)))
    out = tmp_path / "out"
    args = ["batch", str(table), "-o", f"{out}/", "-f", "jsonl", "--shard-rows", "2", "--keep-cols", "id",
            "-k", "1"]
    assert invoke(args, model=model).exit_code == 0
    (out / "part-00002.jsonl").unlink()  # as if the run had been killed before its last part
    result = invoke([*args, "--resume"], model=model)
    assert result.exit_code == 0, result.stderr
    assert sorted(int(r["id"]) for r in part_rows(out)) == list(range(6))


def test_eval_reads_a_labelled_parquet_table_as_batch_reads_tables(data: Path, model: Path,
                                                                   tmp_path: Path) -> None:
    table = tmp_path / "val.parquet"
    pq.write_table(pa.table({"path": [str(data / f"pics/{i}.png") for i in range(4)],
                             "label": ["tabby", "n01440764", "967", None]}), table)
    result = invoke(["eval", str(table), "--json", "-q"], model=model)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["images"], report["labelled"]) == (4, 3)
    classes = {c["label"] for c in report["worst_classes"]}
    assert classes == {"tabby", "tench", "espresso"}
    pq.write_table(pa.table({"path": [str(data / "pics/0.png")], "label": ["tabbz"]}), table)
    bad = invoke(["eval", str(table)], model=model)
    assert bad.exit_code == 2 and "unknown class 'tabbz'" in bad.stderr


def test_on_a_local_ray_instance_the_workers_read_the_bucket(s3: dict[str, str], model: Path,
                                                             tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "ray.jsonl"
    local = tmp_path / "local.jsonl"
    args = ["s3://bkt/table.parquet", "s3://bkt/shards/000.tar", "-k", "1", "--keep-cols", "id"]
    proc = run_cli(["batch", *args, "-o", str(out), "--engine", "ray", "--actors", "1"],
                   env=cli_env(model, **s3), timeout=300)
    assert proc.returncode == 1, proc.stderr  # photos/missing.png
    here = run_cli(["batch", *args, "-o", str(local)], env=cli_env(model, **s3))
    assert here.returncode == 1, here.stderr
    strip = [{k: r.get(k) for k in ("input", "label", "error", "id")} for r in rows(out.read_text())]
    assert strip == [{k: r.get(k) for k in ("input", "label", "error", "id")}
                     for r in rows(local.read_text())]
    assert [r["id"] for r in strip[:7]] == list(range(7))
    assert len(strip) == 9 and strip[6]["error"] == "no such object"
