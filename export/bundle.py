"""A self-describing ONNX bundle: model, tokenizer/catalog files, bundle.json, manifest.json.

Written into a hidden sibling folder and renamed into place only after the model is saved,
validated and hashed, so a failed export never leaves a folder that looks like a bundle.
The engine reads it back with :meth:`hatllm_edge.engine.session.OnnxBackend.from_bundle`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import HatLLMError, InputError
from hatllm_edge.core.formats import (
    BUNDLE_META,
    CATALOG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    ModelMeta,
    file_digest_key,
)
from hatllm_edge.core.machine import versions
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.engine.bundle import file_sha256
from hatllm_edge.engine.cache import clean_stale, partial_prefix
from hatllm_edge.export.calibrate import (
    CALIBRATION_PROMPTS,
    activation_absmax,
    calibration_sequences,
)
from hatllm_edge.export.convert import DType, Quant, export_onnx, resolve_embeddings
from hatllm_edge.export.graph import Embeddings
from hatllm_edge.export.quant.int4 import Int4Options
from hatllm_edge.export.validate import validate
from hatllm_edge.training.model import HatLLM

RESERVED = (MODEL_FILE, f"{MODEL_FILE}.data", BUNDLE_META, MANIFEST_FILE)
EXACT_TOLERANCE = 1e-3  # max |diff| / max |logit| allowed against the exact reference (fp32 graphs)


def _check_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"bundle folder {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"bundle folder {out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _write_files(folder: Path, files: dict[str, Path | bytes]) -> None:
    for name, content in files.items():
        if name in RESERVED or Path(name).name != name or name.startswith("."):
            raise InputError(f"bundle file name {name!r}: must be a plain file name other than {RESERVED}")
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        elif Path(content).is_file():
            shutil.copyfile(content, folder / name)
        else:
            raise InputError(f"bundle file {name}: {content} is not a file")


def write_manifest(folder: Path) -> dict[str, Any]:
    """sha256 and size of every file in ``folder`` (the manifest itself excluded)."""
    files = {p.name: {"sha256": file_sha256(p), "size": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    manifest = {"files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing (empty, or overwritten) folder goes first."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    out_dir.rename(old / out_dir.name)
    try:
        tmp.rename(out_dir)
    except OSError:
        (old / out_dir.name).rename(out_dir)
        raise
    shutil.rmtree(old)


def _calibration_prompts(folder: Path, meta: ModelMeta) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The calibration prompts (:func:`~hatllm_edge.export.calibrate.calibration_sequences`), when
    the bundle carries the tokenizer and catalog to build them from; None otherwise."""
    if not ((folder / TOKENIZER_FILE).is_file() and (folder / CATALOG_FILE).is_file()):
        return None
    prompts = PromptBuilder.from_meta(folder / TOKENIZER_FILE, meta.prompt)
    return list(calibration_sequences(prompts, Catalog.from_jsonl(folder / CATALOG_FILE)))


def export_bundle(
    model: HatLLM,
    out_dir: Path,
    quant: Quant,
    files: dict[str, Path | bytes],
    meta: ModelMeta,
    opset: int = 23,
    progress: bool = True,
    dtype: DType = "fp32",
    int4: Int4Options | None = None,
    overwrite: bool = False,
    check: bool = True,
    embeddings: Embeddings | None = None,
) -> Path:
    """Export ``model`` into the new bundle folder ``out_dir`` and return it.

    ``files``: extra bundle files by name (bytes, or a path to copy). ``meta``: the
    checkpoint's hatllm.json content; bundle.json is ``meta`` plus an ``export`` section (quant,
    opset, layer kinds, sizes, versions, validation figures), so that it reads like the
    checkpoint's own JSON. ``check``: run :func:`hatllm_edge.export.validate.validate` (ONNX Runtime on
    this machine; a float16 graph is recorded, not checked) and fail on an fp32 mismatch.
    """
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    if meta.export is not None:
        raise InputError("meta already has an export section; pass the checkpoint's hatllm.json content")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)  # partial folders of exports that were killed
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(out_dir), dir=out_dir.parent))  # names its pid
    stages = tqdm(total=5 if check else 4, desc=f"export {quant}", unit="stage", disable=not progress)
    try:
        stages.set_postfix_str("files")
        _write_files(tmp, files)
        hashes = {file_digest_key(name): file_sha256(tmp / name) for name in files}
        stages.update()
        stages.set_postfix_str("onnx")
        sequences = _calibration_prompts(tmp, meta)
        # activation statistics for the engine's int8 route (read from fp32 graphs only)
        calibration = activation_absmax(model, sequences) if sequences and dtype == "fp32" else None
        if quant == "int4" and int4 is not None and int4.algo == "gptq" and not int4.calibration and sequences:
            int4 = replace(int4, calibration=tuple(sequences))
        model_path = export_onnx(model, tmp / MODEL_FILE, quant=quant, dtype=dtype, opset=opset, int4=int4,
                                 metadata=hashes, embeddings=embeddings, calibration=calibration)
        stages.update()
        report = None
        if check:
            stages.set_postfix_str("validate")
            report = validate(model, model_path)
            if dtype == "fp32" and report.exact.rel_diff > EXACT_TOLERANCE:
                raise HatLLMError(
                    f"ONNX export does not match PyTorch: max |logit diff| {report.exact.max_abs_diff:.3g} "
                    f"against the {report.exact.reference} model (logit scale {report.exact.logit_scale:.3g})")
            stages.update()
        stages.set_postfix_str("bundle.json")
        kinds = list(model.schedule.kinds)
        export_info = {
            "quant": quant,
            "dtype": dtype,
            "opset": opset,
            "int4": (int4 or Int4Options()).to_dict() if quant == "int4" else None,
            "embeddings": resolve_embeddings(quant, embeddings),
            "layer_kinds": kinds,
            "schedule": model.schedule.to_dict(),
            "model_type": model.config.model_type,
            "sizes": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name.startswith(MODEL_FILE)},
            "parameters": sum(p.numel() for p in model.parameters()),
            "versions": versions(("onnx", "onnxruntime", "torch", "transformers", "bitsandbytes")),
            "validation": report.to_dict() if report else None,
            "calibration": {"prompts": CALIBRATION_PROMPTS, "seed": 0} if calibration else None,
        }
        replace(meta, export=export_info).write(tmp / BUNDLE_META)
        stages.update()
        stages.set_postfix_str("manifest")
        write_manifest(tmp)
        _check_out(out_dir, overwrite)  # the folder may have been filled while we exported
        _move_into_place(tmp, out_dir)
        stages.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        stages.close()
    return out_dir
