#!/usr/bin/env bash
# The CUDA route checked on a lent GPU host, built on ../shared/gpu/ (its README: the host's
# 64 MiB-per-call transfers, what it has installed, and why /tmp must be used at once).
#
# Here, on the CPU (about 20 min on 2 cores, most of it the reference):
#   bash scripts/gpu_check.sh prepare
# builds the shipped model's int4 bundles (fp32: the reference; fp16: what --device cuda runs),
# computes the CPU fp32 native answers to seeded requests (.gpu-check/reference.json), and packs
# onnxruntime-gpu (.gpu-ort/) and the fp16 graph (.gpu-fp16-1/, .gpu-fp16-2/, .gpu-bin/).
# Then on the host, one call after another with no pause (the device tool's `run`):
#   run("bash scripts/gpu_check.sh stage .gpu-ort", carry=[".gpu-ort"])
#   run("bash scripts/gpu_check.sh stage .gpu-fp16-1", carry=[".gpu-fp16-1"])
#   run("bash scripts/gpu_check.sh check", carry=[".gpu-fp16-2", ".gpu-bin", ".gpu-check"])
# The last writes $OUT/{summary.txt, parity.json, latency.json, pytest.log, session_start.stderr}:
# parity with the CPU (100 seeded users: candidate and full-catalog top-10, Kendall tau, score
# differences), latency at batch 1, 8 and 32 (p50, p90, users/s, runs per request, GPU memory)
# with and without CUDA graphs, and the GPU's name and driver. Copy them to results/gpu/; where
# the host had no scipy, `python3 scripts/gpu_check.py taus results/gpu/parity.json
# .gpu-check/reference.json` adds Kendall's tau here.
set -uo pipefail
cd "$(dirname "$0")/.."
shared=${HATLLM_SHARED:-../shared/gpu}
OUT=${OUT:-gpu-check}
BUNDLE=/tmp/hatllm-bundle

case "${1:-}" in
prepare)
  set -e
  he() { hatllm-edge "$@"; }
  [ -f bundles/gpu-int4/bundle.json ] || he export models/hatllm-ml100k bundles/gpu-int4 --quant int4 -q
  [ -f bundles/gpu-int4-fp16/bundle.json ] || he export models/hatllm-ml100k bundles/gpu-int4-fp16 --quant int4 --dtype fp16 -q
  mkdir -p .gpu-check/bundle
  grep -qx '/.gpu-\*/' .git/info/exclude 2>/dev/null || echo '/.gpu-*/' >> .git/info/exclude
  find bundles/gpu-int4-fp16 -maxdepth 1 -type f ! -name model.onnx -exec cp {} .gpu-check/bundle/ \;
  [ -f .gpu-check/reference.json ] || python3 scripts/gpu_check.py reference bundles/gpu-int4 .gpu-check/reference.json
  bash "$shared/pack_ort.sh"
  bash "$shared/pack_file.sh" bundles/gpu-int4-fp16/model.onnx fp16
  du -sh .gpu-check .gpu-ort .gpu-fp16-* .gpu-bin
  ;;
stage)  # one carried folder: onnxruntime-gpu, or one part of the graph
  case "$2" in
    .gpu-ort) bash .gpu-ort/unpack.sh ;;
    *) bash "$2/stage.sh" ;;
  esac
  ;;
check)
  mkdir -p "$OUT"; : > "$OUT/summary.txt"
  export PYTHONUNBUFFERED=1 HATLLM_CACHE=/tmp/hatllm-cache PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  step() { echo "== $1" | tee -a "$OUT/summary.txt"; }
  status=0
  step "assemble the fp16 bundle"
  for part in .gpu-fp16-[0-9]*; do [ -d "$part" ] && bash "$part/stage.sh"; done
  mkdir -p "$BUNDLE" && cp .gpu-check/bundle/* "$BUNDLE/" && bash .gpu-bin/assemble-fp16.sh "$BUNDLE/model.onnx" \
    | tee -a "$OUT/summary.txt" || { echo "the bundle did not assemble" | tee -a "$OUT/summary.txt"; exit 1; }
  python3 -c "import onnxruntime as o, sys; print('onnxruntime', o.__version__, o.get_available_providers()); sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    2>&1 | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "no CUDAExecutionProvider: stage .gpu-ort first" | tee -a "$OUT/summary.txt"; exit 3; }

  step "session start: no provider warning"
  python3 -c "from hatllm_edge.ranking.ranker import Ranker; print(Ranker.from_bundle('$BUNDLE', 'cuda').label)" \
    > "$OUT/session_start.stdout" 2> "$OUT/session_start.stderr" || status=1
  cat "$OUT/session_start.stdout" | tee -a "$OUT/summary.txt"
  if grep -q "No registered plugin EP" "$OUT/session_start.stderr"; then echo "provider warning still printed" | tee -a "$OUT/summary.txt"; status=1; fi

  step "CUDA tests (engine parity on a tiny model, cache rows, CUDA graphs)"
  python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_cuda_graph.py > "$OUT/pytest.log" 2>&1 || status=1
  tail -n 3 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

  step "parity with the CPU and latency (scripts/gpu_check.py)"
  python3 scripts/gpu_check.py check "$BUNDLE" .gpu-check/reference.json --out "$OUT" 2>&1 | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "exit $status" | tee -a "$OUT/summary.txt"
  exit $status
  ;;
*)
  sed -n '2,20p' "$0"; exit 2 ;;
esac
