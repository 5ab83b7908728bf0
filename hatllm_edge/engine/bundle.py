"""An exported bundle on disk: its manifest checked file by file, its ``bundle.json`` read and
held against what the graph records about itself. Kept apart from the session so that export
(which writes the manifest) and the CLI (which reads ``bundle.json``) need no ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    BUNDLE_META,
    MANIFEST_FILE,
    META_DTYPE,
    META_EMBEDDINGS,
    META_LAYER_KINDS,
    META_QUANT,
    MODEL_FILE,
    ModelMeta,
    digest_key_file,
)


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (ONNX Runtime's messages run over several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_bundle_meta(folder: Path) -> ModelMeta:
    """``bundle.json``, or InputError naming what is wrong with it."""
    try:
        meta = ModelMeta.read(Path(folder) / BUNDLE_META)
    except InputError as e:
        raise InputError(f"bundle {folder}: {e}; re-export the bundle") from None
    if meta.export is None:
        raise InputError(f"bundle {folder}: {BUNDLE_META} is not a bundle description (no export section); re-export the bundle")
    return meta


# bundle.json's export section against the graph's own metadata_props: the graph wins
_META_PAIRS = (("quant", META_QUANT), ("dtype", META_DTYPE), ("embeddings", META_EMBEDDINGS), ("layer_kinds", META_LAYER_KINDS))


def check_bundle_meta(folder: Path, meta: ModelMeta, manifest: dict[str, Any], graph: dict[str, str]) -> None:
    """Refuse a bundle whose ``bundle.json`` (or tokenizer/catalog) disagrees with what the graph
    records about itself: it would run one arithmetic under another's label."""
    export = meta.export or {}
    for field, key in _META_PAIRS:
        if field not in export or key not in graph:
            continue
        said = json.dumps(export[field]) if field == "layer_kinds" else str(export[field])
        own = json.dumps(json.loads(graph[key])) if field == "layer_kinds" else graph[key]
        if said != own:
            raise InputError(f"bundle {folder}: {BUNDLE_META} says {field} {said} but {MODEL_FILE} records {own}; "
                             "the bundle was edited after export; re-export it")
    for key, digest in graph.items():  # the files exported with the graph
        if (name := digest_key_file(key)) is not None:
            listed = manifest.get("files", {}).get(name, {}).get("sha256")
            if listed is None:  # dropped from the manifest, so verify_bundle never hashed it
                raise InputError(f"bundle {folder}: {MANIFEST_FILE} does not list {name}, which {MODEL_FILE} was exported with; "
                                 "re-export the bundle")
            if listed != digest:
                raise InputError(f"bundle {folder}: {name} is not the file {MODEL_FILE} was exported with; re-export the bundle")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_bundle(folder: Path, hashes: bool = True) -> dict[str, Any]:
    """Check every file the bundle's manifest lists: present, same size and (when ``hashes``)
    same sha256. Returns the manifest; raises InputError naming the first bad file."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str) for e in files.values()):
            raise ValueError('expected {"files": {name: {"sha256": ..., "size": ...}}}')
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise InputError(f"bundle {folder}: no readable {MANIFEST_FILE} ({first_line(e)}); is this an exported bundle?") from None
    bad = [n for n in files if Path(n).name != n or n.startswith(".")]
    if bad:
        raise InputError(f"bundle {folder}: {MANIFEST_FILE} lists {bad[0]!r}, not a plain file name of the bundle")
    # what the engine reads must be covered (the external weights too, when there are any)
    needed = [MODEL_FILE, BUNDLE_META] + ([f"{MODEL_FILE}.data"] if (folder / f"{MODEL_FILE}.data").exists() else [])
    unlisted = [n for n in needed if n not in files]
    if unlisted:
        raise InputError(f"bundle {folder}: {MANIFEST_FILE} does not list {unlisted[0]}; re-export the bundle")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"bundle {folder}: {name} is missing; re-export or re-copy the bundle")
        if path.stat().st_size != entry["size"]:
            raise InputError(f"bundle {folder}: {name} has {path.stat().st_size} bytes, the manifest says "
                             f"{entry['size']}; the bundle is truncated or was modified")
        if hashes and file_sha256(path) != entry["sha256"]:
            raise InputError(f"bundle {folder}: {name} does not match its sha256 in {MANIFEST_FILE}; "
                             "the bundle is corrupt or was modified")
    return manifest
