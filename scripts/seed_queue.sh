#!/usr/bin/env bash
# The masks-vs-causal comparison's remaining training, unattended on the CPU. Jobs, in turn:
#   ARM:FIRST_SEED  train the arm's $ROUNDS rounds (default 5, the shipped budget; seeds FIRST_SEED
#                   and on; scripts/train_rounds.py, resumable: a folder with fewer rounds done gets
#                   the rest), export and evaluate it into the comparison's spec
#                   (scripts/evaluate_arm.py, skips what is done), and rewrite the comparison
#                   (scripts/compare_arms.py: SPEC without its _spec suffix);
#   ARM:rN          continue the shipped model of the arm (models/ARM-ml100k at ROUND_COMMIT, rounds
#                   seeded 0-3) with rounds 5..N seeded 4..N-1 into runs/ml100k/ARM-shipped, and
#                   evaluate each on validation only (eval_ARM_s0_rK_llm_valid.json): whether more
#                   rounds help is read there before any test figure is. Where SPEC already holds
#                   the seed "rounds seeded 0,...,N-1" of the arm (entered once the rule kept round
#                   N), round N is evaluated in full into it too.
# Re-run the same command after an interruption: finished rounds and evaluations are skipped, a
# round in progress resumes.
#
#   cd /tmp && nohup bash /path/to/checkout/scripts/seed_queue.sh causal:r5 causal:10 hatllm:10 \
#       > /path/to/checkout/runs/ml100k/seed_queue.log 2>&1 &
#
# Training and evaluation import lazily and run for hours, so they run from frozen copies of the
# package made with `git archive` (export/ and models/ moved under hatllm_edge/ as the wheel lays
# them out), not from the checkout being edited: ROUND_COMMIT the training code (train_rounds.py
# with --rounds; the seed-10 arms' first four rounds were trained at ca84f30, whose steps compute
# the same), EVAL_COMMIT the code every seed is evaluated with (the tree-layout beam search).
# ROUND_COMMIT's models/ is where ARM:rN starts, so a later shipped model does not change what a
# restarted job continues. All at nice 10, two threads; one queue at a time (a lock file), one
# training at a time. Read progress with
#   tr '\r' '\n' < runs/ml100k/seed_queue.log | grep -v '^$' | tail -1
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
EVAL_COMMIT=${EVAL_COMMIT:-8ad6818}
ROUND_COMMIT=${ROUND_COMMIT:-433192c}
ROUNDS=${ROUNDS:-5}
SNAPS=${SNAPS:-${TMPDIR:-/tmp}/hatllm-snapshots}
SPEC=${SPEC:-results/ml100k/hatllm_vs_causal_r5_spec.json}
[ $# -gt 0 ] || { echo "usage: $0 JOB... with JOB ARM:FIRST_SEED or ARM:rN (e.g. causal:10 hatllm:r5 hatllm:20)" >&2; exit 2; }
for job in "$@"; do  # every job checked before hours of work start
  [[ $job =~ ^(hatllm|causal):((0|[1-9][0-9]*)|r([5-9]|[1-9][0-9]+))$ ]] \
    || { echo "bad job $job: expected ARM:FIRST_SEED (hatllm:20) or ARM:rN with N >= 5 (causal:r5)" >&2; exit 2; }
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS=$ROUNDS: expected a number of rounds (5)" >&2; exit 2; }
[[ $SPEC == *_spec.json && -f $REPO/$SPEC ]] || { echo "SPEC=$SPEC: expected an existing results/.../NAME_spec.json" >&2; exit 2; }
COMPARISON=${SPEC%_spec.json}.json
mkdir -p "$REPO/runs/ml100k"
exec 9> "$REPO/runs/ml100k/seed_queue.lock"
flock -n 9 || { echo "another seed_queue.sh is running (runs/ml100k/seed_queue.lock)" >&2; exit 1; }

snapshot() {  # commit -> folder holding a frozen hatllm_edge/ and scripts/ (made whole, then moved in place)
  local dir=$SNAPS/$1
  if [ ! -d "$dir" ]; then
    rm -rf "$dir.part" && mkdir -p "$dir.part" || return 1
    (cd "$REPO" && git archive "$1" hatllm_edge export models scripts) | tar -x -C "$dir.part" || return 1
    mv "$dir.part/export" "$dir.part/hatllm_edge/export" && mv "$dir.part/models" "$dir.part/hatllm_edge/models" || return 1
    mv "$dir.part" "$dir" || return 1
  fi
  echo "$dir"
}
eval_code=$(snapshot "$EVAL_COMMIT") || { echo "cannot snapshot $EVAL_COMMIT" >&2; exit 1; }
round_code=$(snapshot "$ROUND_COMMIT") || { echo "cannot snapshot $ROUND_COMMIT" >&2; exit 1; }
evaluate() {  # evaluate_arm.py ARGS... from the frozen evaluation code
  (cd "$REPO" && PYTHONPATH=$eval_code nice -n 10 "$PY" "$round_code/scripts/evaluate_arm.py" "$@")
}
has_seed() {  # ARM LABEL: whether SPEC's arm holds a seed of that label
  "$PY" -c 'import json, sys; s = json.load(open(sys.argv[1]))
sys.exit(sys.argv[3] not in [seed["label"] for seed in s["arms"][sys.argv[2]]["seeds"]])' "$REPO/$SPEC" "$1" "$2"
}
compare() {
  (cd "$REPO" && "$PY" scripts/compare_arms.py "$SPEC" --out "$COMPARISON")
}

for job in "$@"; do
  arm=${job%%:*} what=${job##*:}
  while pgrep -f "train_rounds\.py (hatllm|causal) " > /dev/null; do sleep 60; done  # one training at a time
  if [[ $what == r* ]]; then  # the shipped model, further rounds
    last=${what#r} out=$REPO/runs/ml100k/$arm-shipped
    seeds=$(seq -s, 4 $((last - 1)))
    echo "== $(date -u +%FT%TZ) train $arm rounds 5-$last seeds $seeds from models/$arm-ml100k -> $out"
    (cd /tmp && PYTHONPATH=$round_code nice -n 10 "$PY" "$round_code/scripts/train_rounds.py" "$arm" --rounds "$last" \
        --start "5:$round_code/hatllm_edge/models/$arm-ml100k" --seeds "$seeds" --out "$out" --threads 2) \
      || { echo "training $job failed" >&2; exit 1; }
    [ -f "$out/r$last/last/hatllm.json" ] || { echo "training $job stopped before its last round" >&2; exit 1; }
    for n in $(seq 5 "$last"); do
      echo "== $(date -u +%FT%TZ) evaluate ${arm}_s0_r$n on validation"
      evaluate "$out/r$n" --name "${arm}_s0_r$n" --only valid/llm || { echo "evaluating $job failed" >&2; exit 1; }
      label="rounds seeded $(seq -s, 0 $((n - 1)))"
      if has_seed "$arm" "$label"; then  # round n was kept: the seed's full evaluation
        echo "== $(date -u +%FT%TZ) evaluate ${arm}_s0_r$n into $SPEC"
        mkdir -p "$REPO/results/ml100k/${arm}_s0_r$n"
        cp "$out/r$n"/{hatllm.json,train_log.jsonl,valid_log.jsonl} "$REPO/results/ml100k/${arm}_s0_r$n/" \
          && evaluate "$out/r$n" --name "${arm}_s0_r$n" --arm "$arm" --label "$label" --spec "$SPEC" && compare \
          || { echo "evaluating $job failed" >&2; exit 1; }
      fi
    done
    echo "== $(date -u +%FT%TZ) done $job"
    continue
  fi
  first=$what seeds=$(seq -s, "$first" $((first + ROUNDS - 1)))
  out=$REPO/runs/ml100k/$arm-seeds$first name=${arm}_s${first}_r$ROUNDS
  echo "== $(date -u +%FT%TZ) train $arm rounds 1-$ROUNDS seeds $seeds -> $out"
  (cd /tmp && PYTHONPATH=$round_code nice -n 10 "$PY" "$round_code/scripts/train_rounds.py" "$arm" --rounds "$ROUNDS" \
      --seeds "$seeds" --out "$out" --threads 2) || { echo "training $job failed" >&2; exit 1; }
  [ -f "$out/r$ROUNDS/last/hatllm.json" ] || { echo "training $job stopped before its last round" >&2; exit 1; }
  echo "== $(date -u +%FT%TZ) evaluate $name"
  evaluate "$out" --name "$name" --spec "$SPEC" && compare || { echo "evaluating $job failed" >&2; exit 1; }
  echo "== $(date -u +%FT%TZ) done $job"
done
