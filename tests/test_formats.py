"""formats: every output format carries the same fields, and rows round-trip through
each of them whatever the names, labels and scores."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ofacls.encoders import ParquetEncoder
from ofacls.errors import OutputError
from ofacls.formats import (
    FORMATS,
    Scanner,
    csv_header,
    csv_line,
    csv_row,
    format_score,
    holds_no_rows,
    json_line,
    output_format,
    parquet_journal,
    prediction_of,
    read_rows,
    tsv_line,
)
from ofacls.outfile import OutputFile
from ofacls.prediction import Prediction

ROOT = Path(__file__).resolve().parents[1]

CAT = Prediction("a.jpg", "tabby cat", 0.75,
                 [("tabby cat", 0.75), ("tiger cat", 0.125), ("lynx", 0.0625)], indices=[281, 282, 287])
BAD = Prediction.failed("b.jpg", "not an image PIL can decode")


def test_csv_header() -> None:
    assert csv_header(1) == ["input", "label", "score", "index", "error"]
    assert csv_header(3) == ["input", "label", "score", "index", "error",
                             "label_2", "score_2", "index_2", "label_3", "score_3", "index_3"]
    with pytest.raises(ValueError):
        csv_header(0)


def test_csv_row_pads_and_truncates_to_top_k() -> None:
    assert csv_row(CAT, 1) == ["a.jpg", "tabby cat", "0.75", "281", ""]
    assert csv_row(CAT, 2) == ["a.jpg", "tabby cat", "0.75", "281", "", "tiger cat", "0.125", "282"]
    assert csv_row(CAT, 5)[-6:] == [""] * 6
    assert csv_row(BAD, 2) == ["b.jpg", "", "", "", "not an image PIL can decode", "", "", ""]
    assert len(csv_row(BAD, 3)) == len(csv_header(3))
    unindexed = Prediction("c.jpg", "cat", 0.5, [("cat", 0.5), ("dog", 0.25)])
    assert csv_row(unindexed, 2) == ["c.jpg", "cat", "0.5", "", "", "dog", "0.25", ""]


def test_csv_line_quotes_what_needs_quoting() -> None:
    odd = Prediction.failed('my, "odd"\nname\r.jpg', "x")
    assert csv_line(odd, 1) == '"my, ""odd""\nname\r.jpg",,,,x\n'
    assert csv_line(CAT, 1) == "a.jpg,tabby cat,0.75,281,\n"


def test_tsv_line_escapes_tabs_newlines_and_backslashes() -> None:
    odd = Prediction("a\tb\nc\\d\re.jpg", "cat", 0.5, [("cat", 0.5)], indices=[3])
    assert tsv_line(odd, 1) == "a\\tb\\nc\\\\d\\re.jpg\tcat\t0.5\t3\t\n"
    assert tsv_line(odd, 1).count("\t") == 4 and tsv_line(odd, 1).count("\n") == 1


def test_json_line_is_the_prediction_schema() -> None:
    line = json_line(Prediction("café.jpg", "cat", 0.5, [("cat", 0.5)], indices=[7]))
    assert "\n" not in line and "café" in line
    assert json.loads(line) == {"input": "café.jpg", "label": "cat", "score": 0.5, "index": 7,
                                "top_k": [{"label": "cat", "score": 0.5, "index": 7}], "error": None}
    assert list(json.loads(json_line(BAD))) == ["input", "label", "score", "index", "top_k", "error"]


@given(st.floats(min_value=0, max_value=1))
def test_scores_round_trip_exactly(score: float) -> None:
    assert float(format_score(score)) == score
    assert format_score(None) == ""


def test_output_format() -> None:
    assert output_format("x.csv") == "csv"
    assert output_format("X.JSONL") == "jsonl"
    assert output_format("x.ndjson") == "jsonl"
    assert output_format("x.json") == "json"
    assert output_format("x.tsv") == "tsv"
    assert output_format("x.parquet") == "parquet"
    assert output_format("x.out", "JSONL") == "jsonl"
    assert output_format("x.out", "ndjson") == "jsonl"
    with pytest.raises(OutputError, match="--format"):
        output_format("x.txt")
    with pytest.raises(OutputError, match="unknown output format 'xml' \\(choose csv, tsv, jsonl"):
        output_format("x.csv", "xml")


def test_holds_no_rows() -> None:
    assert holds_no_rows(b"", "jsonl") and holds_no_rows(b"\n", "csv")
    assert holds_no_rows(b"input,label,score,index,error,label_2,score_2,index_2\n", "csv")
    assert holds_no_rows(b"\xef\xbb\xbfinput,label,score,index,error\n", "csv")
    assert holds_no_rows("\t".join(csv_header(2)).encode() + b"\n", "tsv")
    assert holds_no_rows(b"[\n", "json") and holds_no_rows(b"PAR1", "parquet")
    assert not holds_no_rows(b"input,label,score,index,error\na,,,,x\n", "csv")
    assert not holds_no_rows(b"name,size\n", "csv")
    assert not holds_no_rows(b'{"input": "a"}\n', "jsonl")
    assert not holds_no_rows(b"[\n{}", "json")


# --- round trips ------------------------------------------------------------------

# POSIX names cannot hold NUL; anything else goes, surrogates aside (they are the
# separate non-UTF-8 case below).
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))
labels = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)
scores = st.floats(min_value=0, max_value=1)
indices = st.integers(min_value=0, max_value=999)
predictions = st.one_of(
    st.builds(
        lambda name, ranked: Prediction(name, ranked[0][0], ranked[0][1], [r[:2] for r in ranked],
                                        indices=[r[2] for r in ranked]),
        text,
        st.lists(st.tuples(labels, scores, indices), min_size=1, max_size=4),
    ),
    st.builds(Prediction.failed, text, text),
)


@settings(max_examples=40, deadline=None)
@given(preds=st.lists(predictions, min_size=1, max_size=6), fmt=st.sampled_from(FORMATS))
def test_any_row_round_trips_through_every_format(preds: list[Prediction], fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"out.{fmt}"
        with OutputFile(out, top_k=4) as f:
            for p in preds:
                f.write(p)
        rows = read_rows(out)
        assert rows == [p.to_dict() for p in preds]
        assert [prediction_of(r) for r in rows] == preds


def test_every_format_has_the_same_fields(tmp_path: Path) -> None:
    rows = {}
    for fmt in FORMATS:
        out = tmp_path / f"out.{fmt}"
        with OutputFile(out, top_k=3) as f:
            f.write(CAT)
            f.write(BAD)
        rows[fmt] = read_rows(out)
    assert all(r == rows["csv"] for r in rows.values())
    assert list(rows["parquet"][0]) == ["input", "label", "score", "index", "top_k", "error"]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json"])
def test_non_utf8_names_round_trip_byte_for_byte(tmp_path: Path, fmt: str) -> None:
    name = os.fsdecode(b"caf\xe9, \xff.jpg")  # as os.scandir gives a Latin-1 name
    out = tmp_path / f"out.{fmt}"
    with OutputFile(out) as f:
        f.write(Prediction(name, "cat", 0.5, [("cat", 0.5)]))
    assert b"caf\xe9, \xff.jpg" in out.read_bytes()
    assert read_rows(out)[0]["input"] == name


def test_parquet_writes_non_utf8_names_escaped(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    with OutputFile(out) as f:
        f.write(Prediction.failed(os.fsdecode(b"caf\xe9.jpg"), "x"))
    assert read_rows(out)[0]["input"] == "caf\\xe9.jpg"


def test_csv_and_tsv_files_read_as_their_tools_read_them(tmp_path: Path) -> None:
    odd = Prediction('a "b",\tc\nd.jpg', "cat", 0.5, [("cat", 0.5)], indices=[9])
    for fmt, dialect in (("csv", "excel"), ("tsv", "excel-tab")):
        out = tmp_path / f"out.{fmt}"
        with OutputFile(out, top_k=2) as f:
            f.write(odd)
        records = list(csv.reader(io.StringIO(out.read_text(), newline=""), dialect=dialect))
        assert records[0] == csv_header(2)
        assert records[1][2:4] == ["0.5", "9"] and len(records[1]) == 8
    assert out.read_text().splitlines()[1].split("\t")[0] == 'a "b",\\tc\\nd.jpg'


def test_a_json_array_is_whole_after_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    with OutputFile(out) as f:
        for n, pred in enumerate([CAT, BAD, CAT], 1):
            f.write(pred)
            assert len(json.loads(out.read_text())) == n  # a kill here leaves valid JSON
    assert len(read_rows(out)) == 3


def test_json_array_file_layout(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    with OutputFile(out) as f:
        f.write(CAT)
        f.write(BAD)
    text = out.read_text()
    assert text.startswith("[\n{") and text.endswith("}\n]\n") and text.count("\n") == 4
    assert json.loads(text) == [Prediction(CAT.input, CAT.label, CAT.score, CAT.top_k[:3],
                                           indices=CAT.indices).to_dict(), BAD.to_dict()]


@dataclass(frozen=True)
class Labelled(Prediction):
    """A command's row with a field of its own (eval's true label)."""

    true_label: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "true_label": self.true_label}


def test_a_commands_own_columns_come_after_the_others_in_every_format(tmp_path: Path) -> None:
    assert csv_header(1, ["true_label"]) == [*csv_header(1), "true_label"]
    right = Labelled(CAT.input, CAT.label, CAT.score, CAT.top_k[:2], None, CAT.indices[:2],
                     true_label="tabby, cat")
    unknown = Labelled(BAD.input, error=BAD.error)
    assert csv_row(right, 2, ["true_label"])[-1] == "tabby, cat"
    assert csv_row(unknown, 2, ["true_label"])[-1] == ""
    for fmt in FORMATS:
        out = tmp_path / f"out.{fmt}"
        with OutputFile(out, top_k=2, columns=["true_label"]) as f:
            f.write(right)
            f.write(unknown)
        assert read_rows(out) == [right.to_dict(), unknown.to_dict()], fmt


def test_parquet_goes_out_in_row_groups_as_rows_come() -> None:
    import pyarrow.parquet as pq

    enc = ParquetEncoder(top_k=3, group_rows=2)
    chunks = [enc.row(CAT), enc.row(BAD), enc.row(CAT)]
    assert chunks[0] == b"" and chunks[1].startswith(b"PAR1") and chunks[2] == b""
    data = b"".join(chunks) + enc.footer()
    table = pq.read_table(io.BytesIO(data))
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == 2
    assert table.schema.names == ["input", "label", "score", "index", "top_k", "error"]
    assert str(table.schema.field("index").type) == "int64"
    assert table.to_pylist() == [CAT.to_dict(), BAD.to_dict(), CAT.to_dict()]


def test_parquet_without_pyarrow_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "from ofacls.outfile import OutputFile\n"
            "from ofacls.errors import OutputError\n"
            "try:\n    OutputFile(sys.argv[1])\nexcept OutputError as e:\n    print(e)\n")
    out = tmp_path / "out.parquet"
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, text=True,
                            capture_output=True, timeout=30)
    assert result.stdout == "Parquet output needs pyarrow: pip install 'ofacls[parquet]'\n", result.stderr
    assert not out.exists()


# --- reading back -----------------------------------------------------------------


def scan(data: bytes, fmt: str) -> tuple[list[dict[str, object]], Scanner]:
    scanner = Scanner(io.BytesIO(data), fmt, "out")
    return [r.row for r in scanner], scanner


def test_scanner_gives_each_row_with_its_bytes() -> None:
    header = ",".join(csv_header(1)) + "\n"
    data = (header + csv_line(CAT, 1) + "\n" + csv_line(BAD, 1)).encode()
    records = list(Scanner(io.BytesIO(data), "csv", "out"))
    assert [r.line for r in records] == [2, 4]
    assert [data[r.start : r.end] for r in records] == [r.raw for r in records]
    assert records[1].raw == csv_line(BAD, 1).encode()


@pytest.mark.parametrize(("fmt", "data"), [
    ("jsonl", b'{"input": "a", "error": null}\n{"input": "b", "err'),
    ("csv", b"input,label,score,index,error\na,,,,x\nb,cat,0.5"),
    ("csv", b'input,label,score,index,error\na,,,,x\n"b'),  # a quote opened on the torn line
    ("tsv", b"input\tlabel\tscore\tindex\terror\na\t\t\t\tx\nb\t"),
])
def test_a_torn_last_line_is_left_out(fmt: str, data: bytes) -> None:
    rows, scanner = scan(data, fmt)
    assert [r["input"] for r in rows] == ["a"] and scanner.torn


@pytest.mark.parametrize(("fmt", "data", "message"), [
    ("jsonl", b'{"input": "a", "error": null}\nnot json\n', "out line 2 is not an ofacls JSON row$"),
    ("jsonl", b'{"input": "a"}\n', 'out line 1 is not an ofacls JSON row \\(no "error" field\\)'),
    ("jsonl", b'{"input": "a", "error": 3}\n', "line 1 .*neither text nor null"),
    ("csv", b"name,size\na.jpg,3\n", "out is not an ofacls CSV file"),
    ("csv", b"input,label,score,error\na,,,x\n", "written by ofacls 0.1, without class indices"),
    ("csv", b'input,label,score,index,error\na,b,0.5,1,\n"x"y,,,,\n', "line 3 is not valid CSV"),
    # a quote that never closes would swallow every row after it: refused, not torn
    ("csv", b'input,label,score,index,error\na,,,,x\n"b,,,,x\nc,,,,x\nd,,,,x\n',
     "^out line 3 opens a quoted field that is never closed$"),
    ("csv", b'input,label,score,index,error\na,,,,x\n"b\nc,', "line 3 opens a quoted field"),
    ("csv", b'input,label,score,index,error\na,,,,x\n"b\n', "line 3 opens a quoted field"),
    ("csv", b"input,label,score,index,error\na.jpg,cat,high,1,\n", "line 2 is not an ofacls row"),
    ("csv", b"input,label,score,index,error\na.jpg,cat\n", "line 2 is not an ofacls row"),
    ("tsv", b"input\tlabel\tscore\tindex\terror\na\tcat\t0.5\tone\t\n", "line 2 is not an ofacls row"),
])
def test_what_is_not_a_row_is_refused_with_its_line(fmt: str, data: bytes, message: str) -> None:
    with pytest.raises(OutputError, match=message):
        scan(data, fmt)


def test_a_json_array_is_scanned_a_row_a_line_with_each_object_apart_from_its_comma() -> None:
    data = ("[\n" + json_line(CAT) + ",\n" + json_line(BAD) + "\n]\n").encode()
    scanner = Scanner(io.BytesIO(data), "json", "out")
    records = list(scanner)
    assert [r.row for r in records] == [CAT.to_dict(), BAD.to_dict()]
    assert scanner.header_end == 2 and not scanner.torn
    assert [r.body for r in records] == [json_line(CAT).encode(), json_line(BAD).encode()]
    assert records[0].raw == json_line(CAT).encode() + b",\n"
    torn, scanner = scan(data[: data.index(b"\n]")] + b",\n{\"input\": \"c", "json")
    assert [r["input"] for r in torn] == ["a.jpg", "b.jpg"] and scanner.torn


def test_read_rows_reads_a_parquet_files_journal_while_it_is_there(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    write_rows(out, CAT)
    assert read_rows(out) == [CAT.to_dict()]
    Path(parquet_journal(out)).write_text(json_line(BAD) + "\n")  # a run writing it, or killed
    assert read_rows(out) == [BAD.to_dict()]


def write_rows(out: Path, *preds: Prediction) -> None:
    with OutputFile(out, top_k=3) as f:
        for p in preds:
            f.write(p)


def test_read_rows_refuses_an_unfinished_json_array(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    out.write_text('[\n{"input": "a"},\n')
    with pytest.raises(OutputError, match="is not a JSON array"):
        read_rows(out)
