"""Self-describing checkpoints: a folder that holds everything ``evaluate``/``rank``/``export``
need, so they take no model flags.

    hatllm.json     how it was made: base model, layer schedule, prompt, fine-tuning, data
    tokenizer.json  the tokenizer (prompts are built from it, also by the torch-free engine)
    catalog.jsonl   the rankable items: {"item_id", "title"} per line
    adapter/        the LoRA adapter (peft, safetensors)   -- or --
    model.safetensors  the full fine-tuned weights
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    ADAPTER_DIR,
    CATALOG_FILE,
    CHECKPOINT_META,
    FULL_WEIGHTS,
    TOKENIZER_FILE,
    ModelMeta,
)
from hatllm_edge.core.masks import LayerSchedule
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.training.model import BaseModelSpec, HatLLM, load_base


@dataclass
class Loaded:
    """A ready model: LoRA merged, the prompt builder and the catalog it ranks."""

    model: HatLLM
    prompts: PromptBuilder
    catalog: Catalog
    meta: ModelMeta
    folder: Path | None


def write_common(folder: Path, tokenizer: Any, catalog: Catalog, meta: ModelMeta) -> None:
    """Write tokenizer, catalog and metadata (the weights are written by the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_FILE))
    (folder / CATALOG_FILE).write_text(catalog.to_jsonl(), encoding="utf-8")
    meta.write(folder / CHECKPOINT_META)


def read_meta(folder: Path) -> ModelMeta:
    path = folder / CHECKPOINT_META
    if not path.is_file():
        raise InputError(f"{folder}: not a hatllm-edge checkpoint (no {CHECKPOINT_META}); train one with 'hatllm-edge train'")
    return ModelMeta.read(path)


def load_checkpoint(folder: Path, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a checkpoint folder: base weights from where ``hatllm.json`` says, then the
    adapter (merged, so inference runs on plain weights) or the full weights."""
    meta = read_meta(folder)
    weights = f"{ADAPTER_DIR}/adapter_config.json" if meta.finetune == "lora" else FULL_WEIGHTS
    missing = [name for name in (TOKENIZER_FILE, CATALOG_FILE, weights) if not (folder / name).exists()]
    if missing:  # checked before the base model loads (a copy without -r leaves adapter/ behind)
        raise InputError(f"{folder}: incomplete checkpoint, missing {', '.join(missing)}; copy the whole folder (cp -r)")
    base, tokenizer = load_base(BaseModelSpec(**meta.base), dtype=dtype)
    if meta.finetune == "lora":
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(folder / ADAPTER_DIR)).merge_and_unload()
    elif meta.finetune == "full":
        from safetensors.torch import load_file

        result = base.load_state_dict(load_file(str(folder / FULL_WEIGHTS)), strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and base.config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise InputError(f"{folder / FULL_WEIGHTS}: does not fit the base model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        base.tie_weights()
    schedule = LayerSchedule(**meta.schedule)
    prompts = PromptBuilder.from_meta(folder / TOKENIZER_FILE, meta.prompt)
    return Loaded(HatLLM(base.eval(), schedule), prompts, Catalog.from_jsonl(folder / CATALOG_FILE), meta, folder)
