"""ModelScope's own pipeline timed on a model folder (run with the reference env's python).

usage: modelscope_baseline.py MODEL_DIR IMAGE [IMAGE ...] [--batch-size N] [--passes N]
Prints one JSON object: import_s, build_s, first_image_s, per_image_s (the best
pass, as our side's figures are), peak_rss_mb.
"""

import argparse
import json
import resource
import time

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("images", nargs="+")
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--passes", type=int, default=2)
a = p.parse_args()

t0 = time.perf_counter()
from modelscope.pipelines import pipeline  # noqa: E402
from modelscope.utils.constant import Tasks  # noqa: E402

t1 = time.perf_counter()
pipe = pipeline(Tasks.image_classification, model=a.model, device="cpu")
t2 = time.perf_counter()
pipe(a.images[0])  # warm-up, as our side gets one
t3 = time.perf_counter()
rest = a.images[1:] or a.images
passes = []
for _ in range(a.passes):
    start = time.perf_counter()
    if a.batch_size > 1:
        pipe(rest, batch_size=a.batch_size)
    else:
        for image in rest:
            pipe(image)
    passes.append((time.perf_counter() - start) / len(rest))
print(json.dumps({
    "import_s": t1 - t0, "build_s": t2 - t1, "first_image_s": t3 - t2,
    "per_image_s": min(passes),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
