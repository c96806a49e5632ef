"""Peak RSS of loading an OFA-Large checkpoint whose token table is stored once
(saved from the CPU) and one that stores it three times (saved from a GPU, as
published files are), measured in one run and reported as a ratio: the extra
copies are checked on a sample of rows and their pages released, so they must
cost little (target: at most 1.1x).

usage: python benchmarks/checkpoint_rss.py [--json OUT]

The one-copy folder is bench.py's OFA-Large-shaped checkpoint (.bench/large-std1.0,
built once, about 2 GB); the three-copy folder is written next to it from the
same weights. Each load runs in a fresh process and classifies one image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

TABLE_NAMES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               "decoder.output_projection.weight")

_CHILD = """
import resource, sys
from ofacls import Classifier
clf = Classifier.from_pretrained(sys.argv[1], device="cpu")
(pred,) = clf.classify([sys.argv[2]])
assert pred.ok, pred.error
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def three_copies(one: Path) -> Path:
    """`one`'s folder with the token table saved as three separate tensors."""
    import torch

    folder = one.with_name(one.name + "-3copies")
    if not (folder / "pytorch_model.bin").exists():
        print(f"writing {folder} ...", file=sys.stderr)
        shutil.copytree(one, folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("pytorch_model.bin"))
        sd = torch.load(one / "pytorch_model.bin", weights_only=True, mmap=True)
        sd = {k: (v.clone() if k in TABLE_NAMES else v) for k, v in sd.items()}
        torch.save(sd, folder / "pytorch_model.bin")
    return folder


def peak_mib(model: Path) -> int:
    photo = ROOT / "tests" / "images" / "chelsea.png"
    out = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(photo)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from bench import build, large

    one = build("large-std1.0", large(1.0))
    three = three_copies(one)
    sizes = {n: (f / "pytorch_model.bin").stat().st_size / 2**20 for n, f in (("one", one),
                                                                            ("three", three))}
    a, b = peak_mib(one), peak_mib(three)
    result = {"one_copy_file_mib": round(sizes["one"]), "three_copy_file_mib": round(sizes["three"]),
              "one_copy_peak_mib": a, "three_copy_peak_mib": b, "ratio": b / a}
    print(f"load + classify peak RSS: one-copy file ({sizes['one']:.0f} MiB) {a} MiB, "
          f"three-copy file ({sizes['three']:.0f} MiB) {b} MiB, ratio {b / a:.2f} "
          "(target <= 1.1)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
