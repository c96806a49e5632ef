"""Peak RSS of `Classifier.classify()` over few and over many inputs, measured in
one run, reported as a ratio: the library's batch path streams, so its memory
must not grow with the number of inputs (only the list of answers does).

usage: python benchmarks/classify_rss.py [--few 4] [--many 500] [--json OUT]

Uses the CLI tests' tiny model (built into .bench/ once) and copies of one test
photo at ImageNet size; each count runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

_CHILD = """
import resource, sys
from pathlib import Path
from ofacls import Classifier
clf = Classifier.from_pretrained(sys.argv[1], device="cpu")
photos = sorted(Path(sys.argv[2]).iterdir())[:int(sys.argv[3])]
preds = clf.classify(photos)
assert len(preds) == len(photos) and all(p.ok for p in preds), [p.error for p in preds if not p.ok]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def setup(many: int) -> tuple[Path, Path]:
    from cli_helpers import tiny_model
    from PIL import Image

    model = ROOT / ".bench" / "tiny"
    if not (model / "pytorch_model.bin").exists():
        tiny_model(model)
    photos = ROOT / ".bench" / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    with Image.open(ROOT / "tests" / "images" / "chelsea.png") as img:
        base = img.convert("RGB").resize((500, 375))
    for i in range(many):
        path = photos / f"{i:05d}.jpg"
        if not path.exists():
            base.rotate(i % 360).save(path, quality=90)
    return model, photos


def peak_mib(model: Path, photos: Path, n: int) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(photos), str(n)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--few", type=int, default=4)
    ap.add_argument("--many", type=int, default=500)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model, photos = setup(args.many)
    few, many = peak_mib(model, photos, args.few), peak_mib(model, photos, args.many)
    result = {"few": args.few, "many": args.many, "few_peak_mib": few, "many_peak_mib": many,
              "ratio": many / few}
    print(f"classify() peak RSS: {args.few} inputs {few} MiB, {args.many} inputs {many} MiB, "
          f"ratio {many / few:.2f} (target <= 1.25)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
