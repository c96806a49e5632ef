"""The benchmarks still run: each on a tiny checkpoint, once, small. Nothing about
their figures is asserted (timings belong to the benchmarks' own runs); what is
checked is that an API change cannot break them unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_on_a_tiny_checkpoint(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke",
                           "--checkpoint", str(model), "--uniform-checkpoint", str(model), "--images", "2",
                           "--skip-reference", "--json", str(out)],
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in ("matmul_peak_gflops", "floor_s", "exact_b4_s", "beam_b4_s", "int8_exact_b4_s",
                "bf16_exact_b4_s", "predict_first_label_s", "predict_peak_rss_mb", "load_peak_rss_mb"):
        assert figures[key] > 0, key
    assert "compute floor per image" in proc.stdout and "time to first label" in proc.stdout
    shares = {k: v for k, v in figures.items() if k.startswith("share_")}
    assert set(shares) == {"share_trunk convolutions", "share_matmuls", "share_attention",
                           "share_other operators", "share_not in operators", "share_decoder and search"}
    assert figures["share_trunk convolutions"] > 0 and figures["share_matmuls"] > 0
    assert 0 < figures["share_decoder and search"] < 1


def test_scale_bench_runs_small(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_bench.py"),
                           "--rows", "30", "60", "--shard-rows", "10", "--pipeline-rows", "30",
                           "--json", str(out)],
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # the one thing the scale benchmark checks for itself: every row exactly once
    assert all(run["exactly_once"] and run["hostile_failed"] for run in report["runs"]), report
    assert report["pipeline"]["rows_per_s"] > 0
