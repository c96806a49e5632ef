"""Record the golden answers of ModelScope's own OFA pipeline.

    python3 tests/goldens/record.py                    # all golden sets
    python3 tests/goldens/record.py r50_traverse       # some of them

For each golden set this builds its checkpoint with tests/ofa_factory.py into a
temporary folder, runs the reference harness on every file in tests/images

    $OFA_REFERENCE_PYTHON $OFA_RUN_REFERENCE FOLDER IMAGE... --topk 5

and writes tests/goldens/<name>.json:

    {"name", "spec": CheckpointSpec fields, "digest": state_dict_digest,
     "tokenizer_digest", "topk", "reference": versions of the reference env,
     "results": {image basename: the harness's JSON row for it}}

(one line per image row; "image" is the basename, and an unreadable image's
row is {"image", "error"} with object addresses masked as 0x...).

The reference runs with its default threads, with one thread and (where asked,
--kernels) under other ATEN_CPU_CAPABILITY values, and each row gets "spread":
the largest change of a score (beam score or traverse
probability) between the two runs. fp32 GEMMs round differently with the thread
count and the CPU, and a confident random checkpoint amplifies that, so the
reference is itself only reproducible to within "spread"; the parity tests
allow it on top of their tolerance. The rows are those of the default run.

Defaults: OFA_REFERENCE_PYTHON = ~/.cache/ofa-reference/venv/bin/python,
OFA_RUN_REFERENCE = <repo>/../shared/reference/run_reference.py (build the env
with ../shared/reference/setup.sh). Both can also be given as options.
The reference runs on CPU and is slow: traverse mode runs a decoder pass per
label, so a set takes several minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

from ofa_factory import (  # noqa: E402
    GOLDEN_SPECS,
    CheckpointSpec,
    build_checkpoint,
    state_dict_digest,
    tokenizer_digest,
    write_configuration,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp"}
TOPK = 5


def image_files(images_dir: Path) -> list[Path]:
    return sorted(p for p in images_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _normalise_row(row: dict) -> dict:
    row = dict(row)
    row["image"] = Path(row["image"]).name
    if "error" in row:  # object addresses change from run to run
        row["error"] = re.sub(r" at 0x[0-9a-fA-F]+", " at 0x...", row["error"])
    return row


def format_golden(golden: dict) -> str:
    """Pretty JSON with one line per image row (plain json.load reads it)."""
    head = {k: v for k, v in golden.items() if k != "results"}
    text = json.dumps(head, indent=1)[:-2]  # drop the closing "\n}"
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                      for k, v in golden["results"].items())
    return f'{text},\n "results": {{\n{rows}\n }}\n}}\n'


def reference_versions(python: str) -> dict:
    code = ("import json, modelscope, torch, transformers, PIL, torchvision;"
            "print(json.dumps({'modelscope': modelscope.__version__, 'torch': torch.__version__,"
            "'torchvision': torchvision.__version__, 'transformers': transformers.__version__,"
            "'pillow': PIL.__version__}))")
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_reference(python: str, script: str, folder: Path, images: list[Path],
                  topk: int, threads: int | None = None, kernel: str | None = None
                  ) -> dict[str, dict]:
    cmd = [python, script, str(folder), *[p.name for p in images], "--topk", str(topk)]
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if kernel is not None:
        env.update(ATEN_CPU_CAPABILITY=kernel)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=images[0].parent, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"reference failed ({proc.returncode}): {' '.join(cmd)}")
    rows = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = _normalise_row(json.loads(line))
            rows[row["image"]] = row
    missing = [p.name for p in images if p.name not in rows]
    if missing:
        raise SystemExit(f"reference gave no row for {missing}")
    print(f"  reference: {len(rows)} images in {time.time() - t0:.0f}s", flush=True)
    return rows


def _scores(row: dict) -> dict[str, float]:
    return dict((lab, score) for lab, score in row.get("beams", row.get("traverse_top", [])))


def with_spread(rows: dict[str, dict], *agains: dict[str, dict]) -> dict[str, dict]:
    """rows, each with "spread": its largest score change in the other runs `agains`.
    A label that only one run lists counts with its whole score."""
    out = {}
    for name, row in rows.items():
        if "error" not in row:
            a = _scores(row)
            row = {**row, "spread": max(abs(a.get(k, 0.0) - b.get(k, 0.0))
                                        for b in (_scores(again[name]) for again in agains)
                                        for k in a | b)}
        out[name] = row
    return out


def summarise(name: str, results: dict[str, dict]) -> tuple[str, bool]:
    """A one-paragraph variety report, and whether the set looks degenerate."""
    ok = {k: r for k, r in results.items() if "error" not in r}
    top1 = {}
    for k, r in ok.items():
        lab = r["labels"]
        top1[k] = lab[0] if isinstance(lab, list) else lab
    distinct = len(set(top1.values()))
    lines = [f"{name}: {len(ok)} images answered, {len(results) - len(ok)} errors, "
             f"{distinct} distinct top-1 labels"]
    degenerate = distinct < max(2, len(ok) // 3)
    probs = [r["traverse_top"][0][1] for r in ok.values() if "traverse_top" in r]
    if probs:
        lines.append(f"  traverse top-1 prob min {min(probs):.4f} max {max(probs):.4f}")
        if all(p > 0.99 for p in probs) or all(p < 0.01 for p in probs):
            degenerate = True
    for k, r in ok.items():
        extra = ""
        if "traverse_top" in r:
            extra = " ".join(f"{lab}:{p:.3f}" for lab, p in r["traverse_top"][:3])
        elif "beams" in r:
            extra = " | ".join(f"{lab}:{s:.3f}" for lab, s in r["beams"][:3])
        lines.append(f"  {k:28s} {top1[k]!s:28s} {extra}")
    return "\n".join(lines), degenerate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"golden sets (default all: {list(GOLDEN_SPECS)})")
    ap.add_argument("--reference-python", default=os.environ.get(
        "OFA_REFERENCE_PYTHON", str(Path.home() / ".cache/ofa-reference/venv/bin/python")))
    ap.add_argument("--run-reference", default=os.environ.get(
        "OFA_RUN_REFERENCE", str(REPO.parent / "shared/reference/run_reference.py")))
    ap.add_argument("--images", default=str(TESTS / "images"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--workdir", default=None, help="where to build checkpoints (default: a temp dir)")
    ap.add_argument("--topk", type=int, default=TOPK)
    ap.add_argument("--kernels", nargs="*", default=[],
                    help="ATEN_CPU_CAPABILITY values to run the reference under too (default, avx2, avx512)")
    a = ap.parse_args(argv)

    names = a.names or list(GOLDEN_SPECS)
    unknown = [n for n in names if n not in GOLDEN_SPECS]
    if unknown:
        ap.error(f"unknown golden sets {unknown}; known: {list(GOLDEN_SPECS)}")
    for path in (a.reference_python, a.run_reference):
        if not Path(path).exists():
            ap.error(f"{path} not found (see --reference-python / --run-reference)")
    images = image_files(Path(a.images))
    versions = reference_versions(a.reference_python)
    print("reference env:", versions, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="ofa-goldens-", dir=a.workdir)
    built: dict[CheckpointSpec, Path] = {}  # weights-only spec -> folder
    bad = []
    try:
        for name in names:
            spec = GOLDEN_SPECS[name]
            key = spec.weights_only()
            print(f"[{name}] {spec}", flush=True)
            if key in built:
                folder = built[key]
                write_configuration(folder, spec)
            else:
                folder = build_checkpoint(Path(tmp.name) / name, spec)
                built[key] = folder
            digest = state_dict_digest(folder)
            results = with_spread(
                run_reference(a.reference_python, a.run_reference, folder, images, a.topk),
                run_reference(a.reference_python, a.run_reference, folder, images, a.topk,
                              threads=1),
                *[run_reference(a.reference_python, a.run_reference, folder, images, a.topk,
                                kernel=kernel) for kernel in a.kernels])
            golden = {
                "name": name,
                "spec": spec.to_dict(),
                "digest": digest,
                "tokenizer_digest": tokenizer_digest(folder),
                "topk": a.topk,
                "reference": versions,
                "results": results,
            }
            out = Path(a.out) / f"{name}.json"
            out.write_text(format_golden(golden), encoding="utf-8")
            report, degenerate = summarise(name, results)
            print(report, flush=True)
            print(f"  wrote {out}", flush=True)
            if degenerate:
                bad.append(name)
    finally:
        tmp.cleanup()
    if bad:
        print(f"WARNING: degenerate goldens {bad}: tune the factory's std", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
