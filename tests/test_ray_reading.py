"""Tables and shards read where they are classified: the parts a run is cut into
give exactly the inputs a local batch expands, and a Ray run over them writes the
rows a local run writes, each input once, resumed included."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from cli_helpers import cli_env, invoke, run_cli, small_image

from ofacls.sources.expand import BadInput, Source, TableColumns, expand_inputs
from ofacls.sources.parts import Part, plan, read_part

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLUMNS = TableColumns(keep=("id",))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Parquet table of four row groups (a repeated input, a row without one, a
    missing file among them), a CSV table, a folder and two WebDataset shards."""
    root = tmp_path_factory.mktemp("parts")
    sources = ["chelsea.png", "coffee.png", "horse.png", "rocket.jpg", "camera.png"]
    for i, source in enumerate(sources):
        small_image(root / f"pics/{i}.png", source)
    small_image(root / "folder/a.png", "astronaut.png")
    urls = ["pics/0.png", "pics/1.png", "pics/0.png", "pics/2.png", "", "pics/3.png", "missing.png"]
    pq.write_table(pa.table({"url": urls, "id": list(range(len(urls)))}), root / "t.parquet",
                   row_group_size=2)
    (root / "t.csv").write_text("path,id\npics/4.png,40\npics/1.png,41\n", encoding="utf-8")
    for n in range(2):
        with tarfile.open(root / f"s-{n}.tar", "w") as tar:
            tar.add(root / f"pics/{n}.png", arcname=f"{n:06d}.png")
            meta = b'{"sample": 1}'
            info = tarfile.TarInfo(f"{n:06d}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    return root


def _inputs(root: Path) -> list[str]:
    return [str(root / "t.parquet"), str(root / "folder"), str(root / "t.csv"), str(root / "s-{0..2}.tar"),
            str(root / "nope.jpg")]


def _same(item: Source | BadInput) -> tuple:
    if isinstance(item, BadInput):
        return ("bad", item.name, item.error)
    return ("ok", item.name, item.location, item.is_url, item.data, item.extra)


def test_parts_give_exactly_the_inputs_a_local_batch_expands(data: Path) -> None:
    inputs = _inputs(data)
    parts = list(plan(inputs, lambda arg: expand_inputs([arg], columns=COLUMNS)))
    read = [item for part in parts for _, item in read_part(part, columns=COLUMNS)]
    assert [_same(i) for i in read] == [_same(i) for i in expand_inputs(inputs, columns=COLUMNS)]
    # the table a row group a part, its rows not read here: only its footer was
    tables = [p for p in parts if p.name == str(data / "t.parquet")]
    assert [(p.kind, p.row_group, p.first, p.listed) for p in tables] == [
        ("table", g, 1 + 2 * g, ()) for g in range(4)]
    assert [p.index for p in parts] == list(range(len(parts)))
    kinds = [p.kind for p in parts]
    assert kinds == ["table"] * 4 + ["listed", "table", "shard", "shard", "listed"]
    # the pattern's third shard does not exist: listed, with the local run's error
    assert [_same(i) for i in parts[-1].listed] == [
        _same(i) for i in expand_inputs([str(data / "s-2.tar"), str(data / "nope.jpg")])]


def test_a_part_read_again_gives_the_inputs_asked_for(data: Path) -> None:
    part = next(p for p in plan([str(data / "t.parquet")], lambda a: iter(())) if p.row_group == 2)
    every = list(read_part(part, columns=COLUMNS))
    assert [(n, i.name) for n, i in every] == [(0, f"{data / 't.parquet'}:5"), (1, "pics/3.png")]
    again = Part(part.index, part.kind, part.name, part.location, part.row_group, part.first,
                 only=frozenset({1}))
    assert [(n, i.name, i.extra) for n, i in read_part(again, columns=COLUMNS)] == [
        (1, "pics/3.png", {"id": 5})]


def test_a_broken_table_is_one_part_whose_reader_says_why(data: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not a table")
    parts = list(plan([str(broken)], lambda a: iter(())))
    assert len(parts) == 1 and parts[0].row_group is None
    (_, item), = read_part(parts[0])
    assert isinstance(item, BadInput) and item.name == str(broken) and "cannot read this table" in item.error


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(folder.glob("part-*.jsonl"))
            for line in part.read_text().splitlines() if line.strip()]


def test_on_ray_the_workers_read_the_tables_and_a_resume_redoes_only_the_rest(
        data: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of parts begun by a local run over the table's first two rows, then
    resumed on a local Ray instance over everything: every naming once (the repeated
    input's second naming classified in the second round), rows and kept columns as
    a local run over the same inputs writes them."""
    pytest.importorskip("ray")
    monkeypatch.chdir(data)  # the table's rows are named relative to it, as typed
    first = data / "first.parquet"  # beside the pictures its rows name
    pq.write_table(pa.table({"url": ["pics/0.png", "pics/1.png"], "id": [0, 1]}), first)
    out, local = tmp_path / "out", tmp_path / "local"
    common = ["-k", "1", "--keep-cols", "id", "--shard-rows", "2", "--format", "jsonl", "-q"]
    begun = invoke(["batch", str(first), "-o", f"{out}/", *common], model=model)
    assert begun.exit_code == 0, begun.stderr
    inputs = _inputs(data)
    resumed = run_cli(["batch", *inputs, "-o", f"{out}/", *common[:-1], "--resume", "--engine", "ray",
                       "--actors", "1"], env=cli_env(model), cwd=data, timeout=300)
    assert resumed.returncode == 1, resumed.stderr  # the row without an input, the missing files
    assert "skipped 2," in resumed.stderr
    whole = invoke(["batch", *inputs, "-o", f"{local}/", *common], model=model)
    assert whole.exit_code == 1, whole.stderr

    def strip(row: dict) -> tuple:
        return row["input"], row["label"], row["error"], row.get("id")

    got, want = [strip(r) for r in _rows(out)], [strip(r) for r in _rows(local)]
    assert Counter(got) == Counter(want) and len(got) == 14
    # after the resumed rows, the others in input order; then, from the second round,
    # the inputs OUT held one row of, named again (by the table, and by the CSV)
    again = [r for r in want if r[0] in ("pics/0.png", "pics/1.png") and r[3] in (2, "41")]
    assert len(again) == 2 and got[2:] == [r for r in want[2:] if r not in again] + again
