"""A SASRec checkpoint folder: ``sasrec.json`` (architecture, item id order, training) and ``model.safetensors``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import ASSISTANT_CONFIG as CONFIG_FILE
from hatllm_edge.core.formats import SASREC_FORMAT as FORMAT
from hatllm_edge.ranking.assistant import read_config
from hatllm_edge.training.sasrec.model import SASRec, SASRecConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
LOG_FILE = "train_log.jsonl"




def _check_catalog(meta: dict[str, Any], catalog: Catalog, where: Path) -> None:
    if tuple(meta["item_ids"]) != catalog.item_ids:
        raise InputError(f"{where}: the checkpoint's item ids differ from this data set's catalog (order or content)")


def save_checkpoint(folder: Path, model: SASRec, item_ids: Sequence[str], extra: dict[str, Any] | None = None) -> None:
    """``model.safetensors`` + ``sasrec.json`` (architecture, item id order, ``extra``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if len(item_ids) != model.cfg.num_items:
        raise ValueError(f"{len(item_ids)} item ids for a model of {model.cfg.num_items} items")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": asdict(model.cfg), "item_ids": list(item_ids), **(extra or {})}
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    tmp.replace(folder / CONFIG_FILE)




def load_checkpoint(folder: Path) -> tuple[SASRec, dict[str, Any]]:
    """The model (eval mode) and its ``sasrec.json``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_config(folder)
    model = SASRec(SASRecConfig(**meta["model"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), meta
