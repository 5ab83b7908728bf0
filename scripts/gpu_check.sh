#!/usr/bin/env bash
# CUDA check for a lent GPU machine: install carried wheels, CUDA parity tests, a latency table.
# Writes everything under $OUT (default ./gpu-check): pip.log, pytest.log, bench/bench.json,
# bench/bench.png, rank.json, summary.txt. Exit 0 only when every step passed.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh          # ~3-5 min on an H200 once the wheels are in
#
# Needs onnxruntime-gpu (the CUDA execution provider). Wheels carried in .whl/ are installed
# first (--no-index); see docs/design.md ("GPU check") for what to carry and its size limits.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HATLLM_CACHE="${HATLLM_CACHE:-/tmp/hatllm-cache}"
status=0
step() { echo "== $1" | tee -a "$OUT/summary.txt"; }

step "install"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "carried wheels failed to install" | tee -a "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import onnxruntime as ort, sys
print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())
sys.exit(0 if "CUDAExecutionProvider" in ort.get_available_providers() else 3)
PY
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "no CUDAExecutionProvider: carry onnxruntime-gpu (and its CUDA libraries) in .whl/" | tee -a "$OUT/summary.txt"
  exit 3
fi
HE=(python3 -c 'import sys; from cli import main; sys.argv[0] = "hatllm-edge"; main()')

step "parity on CUDA (tests/test_engine.py: fp32 CUDA vs CPU, cache on the device, CUDA refusals)"
python3 -m pytest -q -p no:cacheprovider tests/test_engine.py > "$OUT/pytest.log" 2>&1 || status=1
tail -n 3 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

step "rank on CUDA (default model, int4 bundle built on first use)"
"${HE[@]}" rank examples/user_candidates.json --device cuda --quiet > "$OUT/rank.json" 2>> "$OUT/summary.txt" || status=1
grep -E '"backend"|"latency_ms"' "$OUT/rank.json" | tee -a "$OUT/summary.txt"

step "latency (hatllm-edge bench --device cuda)"
"${HE[@]}" bench --device cuda --threads 4 --workloads cand100-h20-b1,cand100-h20-b8,cand20-h5-b1,top10-h10-b1,top10-h10-b8 \
  --seconds 5 --out "$OUT/bench" --quiet > "$OUT/bench.txt" 2>&1 || status=1
cat "$OUT/bench.txt" | tee -a "$OUT/summary.txt" > /dev/null
echo "exit $status" | tee -a "$OUT/summary.txt"
exit $status
