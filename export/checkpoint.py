"""Export a training checkpoint: load it (LoRA merged), then write the ONNX bundle with the
checkpoint's tokenizer, catalog and metadata. The checkpoint itself is never changed."""

from __future__ import annotations

from pathlib import Path

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    ASSISTANT_CONFIG,
    ASSISTANT_ONNX,
    CATALOG_FILE,
    TOKENIZER_FILE,
    default_quant,
)
from hatllm_edge.export.bundle import export_bundle
from hatllm_edge.export.convert import DType, Quant
from hatllm_edge.export.graph import Embeddings
from hatllm_edge.export.quant.int4 import Int4Options
from hatllm_edge.training.checkpoint import load_checkpoint, read_meta


def export_checkpoint(
    checkpoint: Path, out_dir: Path, quant: Quant | None = None, dtype: DType = "fp32", int4: Int4Options | None = None,
    overwrite: bool = False, progress: bool = True, embeddings: Embeddings | None = None,
) -> Path:
    """The checkpoint's bundle in ``out_dir``; ``quant`` None: the model family's default
    (:func:`~hatllm_edge.core.formats.default_quant`); ``int4`` settings are refused for other
    weights rather than dropped, since a family's default may not be int4."""
    model_type = read_meta(checkpoint).model_type  # checked before the model loads
    quant = quant or default_quant(model_type)
    if int4 is not None and quant != "int4":
        raise InputError(f"{checkpoint}: int4 settings (--int4-algo, --int4-block, --int4-8bit) apply to int4 weights, "
                         f"and this export writes {quant} ({model_type}); pass --quant int4 or leave them out")
    loaded = load_checkpoint(checkpoint)
    files = {TOKENIZER_FILE: checkpoint / TOKENIZER_FILE, CATALOG_FILE: checkpoint / CATALOG_FILE}
    if (checkpoint / ASSISTANT_CONFIG).is_file():  # the collaborative assistant travels with the model
        files.update({ASSISTANT_CONFIG: checkpoint / ASSISTANT_CONFIG, ASSISTANT_ONNX: checkpoint / ASSISTANT_ONNX})
    return export_bundle(
        loaded.model, out_dir, quant, files, loaded.meta, progress=progress, dtype=dtype, int4=int4, overwrite=overwrite,
        embeddings=embeddings,
    )
