"""Average fine-tuned checkpoints of one base model: a weight-space mean of training rounds
(a "model soup"), which often generalises better than any one of them.

LoRA checkpoints are averaged exactly: the mean of the weight updates ``sum_i w_i s_i B_i A_i``
is itself a LoRA update of rank ``sum_i r_i``, with ``A`` the stacked ``A_i`` and ``B`` the
side-by-side ``w_i s_i B_i`` (scaling 1). Averaging ``A`` and ``B`` separately would not be the
mean of the updates. Full fine-tunes are averaged tensor by tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    CATALOG_FILE,
    CHECKPOINT_META,
    FULL_WEIGHTS,
    TOKENIZER_FILE,
    Decoding,
)
from hatllm_edge.training.checkpoint import read_meta

SAME = ("base", "model_type", "schedule", "prompt", "finetune")  # hatllm.json sections every input must share


def _scaling(config: dict, where: Path) -> float:
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise InputError(f"{where}: per-module ranks, alphas or DoRA are not supported by averaging")
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def _average_lora(folders: list[Path], weights: list[float], out: Path) -> None:
    from safetensors.torch import load_file, save_file

    configs = [json.loads((f / ADAPTER_DIR / ADAPTER_CONFIG).read_text(encoding="utf-8")) for f in folders]
    tensors = [load_file(str(f / ADAPTER_DIR / ADAPTER_WEIGHTS)) for f in folders]
    for f, c, t in zip(folders[1:], configs[1:], tensors[1:]):
        if set(c["target_modules"]) != set(configs[0]["target_modules"]) or set(t) != set(tensors[0]):
            raise InputError(f"{f}: its adapter covers other modules than {folders[0]}'s; only checkpoints of one recipe average")
    scales = [w * _scaling(c, f) for f, c, w in zip(folders, configs, weights)]
    merged: dict[str, torch.Tensor] = {}
    for key in tensors[0]:
        if ".lora_A." in key:
            merged[key] = torch.cat([t[key].float() for t in tensors], dim=0).contiguous()
        elif ".lora_B." in key:
            merged[key] = torch.cat([s * t[key].float() for s, t in zip(scales, tensors)], dim=1).contiguous()
        else:
            raise InputError(f"{folders[0]}: adapter tensor {key} is neither lora_A nor lora_B; cannot average it")
    rank = sum(c["r"] for c in configs)
    config = {**configs[0], "r": rank, "lora_alpha": rank, "use_rslora": False}  # scaling 1: the B factors carry it
    (out / ADAPTER_DIR).mkdir(parents=True)
    (out / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(merged, str(out / ADAPTER_DIR / ADAPTER_WEIGHTS))


def _average_full(folders: list[Path], weights: list[float], out: Path) -> None:
    from safetensors.torch import load_file, save_file

    states = [load_file(str(f / FULL_WEIGHTS)) for f in folders]
    for f, s in zip(folders[1:], states[1:]):
        if set(s) != set(states[0]):
            raise InputError(f"{f}: its weights have other tensors than {folders[0]}'s")
    mean = {k: sum(w * s[k].float() for w, s in zip(weights, states)).to(states[0][k].dtype) for k in states[0]}
    out.mkdir(parents=True)
    save_file(mean, str(out / FULL_WEIGHTS))


def average_checkpoints(folders: list[Path], out: Path, weights: list[float] | None = None) -> dict:
    """Write to ``out`` the checkpoint whose weights are the weighted mean of ``folders``'
    (weights default to equal and are normalised to sum to 1). Returns the ``average`` record
    written into its ``hatllm.json``."""
    if len(folders) < 2:
        raise InputError("give at least two checkpoints to average")
    weights = [1.0] * len(folders) if weights is None else list(weights)
    if len(weights) != len(folders) or any(w <= 0 for w in weights):
        raise InputError(f"--weights: need {len(folders)} positive numbers, one per checkpoint; got {weights}")
    weights = [w / sum(weights) for w in weights]
    if out.exists():
        raise InputError(f"{out} already exists; give a new folder")
    metas = [read_meta(f) for f in folders]
    first = metas[0].to_dict()
    for f, m in zip(folders[1:], metas[1:]):
        d = m.to_dict()
        wrong = [k for k in SAME if d.get(k) != first.get(k)]
        if wrong:
            raise InputError(f"{f}: differs from {folders[0]} in {', '.join(wrong)}; only checkpoints of one base and schedule average")
        for name in (TOKENIZER_FILE, CATALOG_FILE):
            if (f / name).read_bytes() != (folders[0] / name).read_bytes():
                raise InputError(f"{f / name}: differs from {folders[0] / name}; averaged checkpoints must rank the same catalog")
    try:
        (_average_lora if metas[0].finetune == "lora" else _average_full)(folders, weights, out)
        for name in (TOKENIZER_FILE, CATALOG_FILE):
            shutil.copyfile(folders[-1] / name, out / name)
        record = {"checkpoints": [str(f) for f in folders], "weights": weights}
        meta = metas[-1]  # the newest round describes the recipe; its own validation no longer applies
        meta.validation = None
        if meta.finetune == "lora":  # the merged adapter's shape (ranks summed, scaling 1), which --init-from checks
            merged = json.loads((out / ADAPTER_DIR / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            meta.train = {**meta.train, "lora_r": merged["r"], "lora_alpha": merged["lora_alpha"]}
        # a fusion chosen for one round is not chosen for the average, and its assistant's files stay
        # behind: the average decodes as its recipe validated (renormalised or not), fused once `fuse` says so
        meta.decoding = Decoding(renormalise=meta.decoding.renormalise) if meta.decoding is not None else None
        meta.extra = {k: v for k, v in meta.extra.items() if k != "validation_full"} | {"average": record}
        meta.write(out / CHECKPOINT_META)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return record
