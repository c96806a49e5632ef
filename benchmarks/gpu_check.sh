#!/usr/bin/env bash
# The one prepared GPU run: CUDA parity with ModelScope's goldens in
# fp32, then images/s for fp32/fp16/bf16 x batch 1/8/64 (exact and beam) with
# the card's name. Writes gpu.json (and the log) under $OUT when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
python -m pip install -q -e '.[test]'
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)"
OFACLS_TEST_DEVICE=cuda python -m pytest -q tests/test_parity.py 2>&1 | tail -3
python benchmarks/gpu.py --json "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
