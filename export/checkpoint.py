"""Export a training checkpoint: load it (LoRA merged), then write the ONNX bundle with the
checkpoint's tokenizer, catalog and metadata. The checkpoint itself is never changed."""

from __future__ import annotations

from pathlib import Path

from export.bundle import export_bundle
from export.convert import DType, Quant
from export.graph import Embeddings
from export.quantize import Int4Options
from hatllm_edge.checkpoint import load_checkpoint
from hatllm_edge.formats import ASSISTANT_CONFIG, ASSISTANT_ONNX, CATALOG_FILE, TOKENIZER_FILE


def export_checkpoint(
    checkpoint: Path, out_dir: Path, quant: Quant = "int4", dtype: DType = "fp32", int4: Int4Options | None = None,
    overwrite: bool = False, progress: bool = True, embeddings: Embeddings | None = None,
) -> Path:
    loaded = load_checkpoint(checkpoint)
    files = {TOKENIZER_FILE: checkpoint / TOKENIZER_FILE, CATALOG_FILE: checkpoint / CATALOG_FILE}
    if (checkpoint / ASSISTANT_CONFIG).is_file():  # the collaborative assistant travels with the model
        files.update({ASSISTANT_CONFIG: checkpoint / ASSISTANT_CONFIG, ASSISTANT_ONNX: checkpoint / ASSISTANT_ONNX})
    return export_bundle(
        loaded.model, out_dir, quant, files, loaded.meta, progress=progress, dtype=dtype, int4=int4, overwrite=overwrite,
        embeddings=embeddings,
    )
