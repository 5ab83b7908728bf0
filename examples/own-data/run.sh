#!/usr/bin/env bash
# Your own data, end to end: train the LLM recommender and SASRec on a CSV catalog and history,
# choose their fusion on validation, export the 4-bit bundle, evaluate it and rank for a user.
# A tiny data set (60 readers, 40 classic novels), so every step finishes in minutes on a CPU;
# for real data raise --examples (0 = every training window) and give the training its time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs/own-data}"
data=(--interactions "$here/interactions.csv" --items "$here/items.csv")

hatllm-edge train "$out/llm" "${data[@]}" --max-history 10 --examples 64 --batch-size 8 --eval-users 0 -q
hatllm-edge sasrec train "$out/sasrec" "${data[@]}" --max-len 20 --stride 20 --batch-size 32 --warmup-steps 10 --max-epochs 60 --patience 10 -q
hatllm-edge sasrec export "$out/sasrec"
hatllm-edge fuse "$out/llm" --assistant "$out/sasrec" "${data[@]}" --weights 0,1,4,16 --renormalise on --users 0 --write -q
hatllm-edge export "$out/llm" "$out/bundle" --quant int4 --overwrite -q
hatllm-edge evaluate "$out/bundle" --split test "${data[@]}" -q --out "$out/test.json"
hatllm-edge popularity --split test "${data[@]}"
echo '{"history": ["Pride and Prejudice (1813)", "Emma (1815)", "Persuasion (1817)"], "k": 5}' |
    hatllm-edge rank - --model "$out/bundle" --table
