"""Every format the project writes and reads, in one torch-free place: the engine's graph
contract, the bundle and checkpoint layouts, and the collaborative assistant's files. The
exporter and the engine both import these names, so a format changes here, once.

Graph contract (written by :mod:`hatllm_edge.export.graph`, read by :mod:`hatllm_edge.engine.session`):

* inputs: ``input_ids``, ``position_ids`` [B, Q] int64; ``mask_{kind}`` bool [B, 1, Q, P+Q] for
  every mask kind the schedule uses; ``past_key_values.{i}.key/value``; ``logits_to_keep``
  (how many last positions get logits) and ``target_ids`` [B, Q] int64;
* outputs: ``logits``, ``target_logprobs`` (log p of each target id), ``present.{i}.key/value``.

Bundle (``hatllm-edge export``): ``model.onnx`` (+ ``model.onnx.data``), ``tokenizer.json``,
``catalog.jsonl``, ``bundle.json`` (the checkpoint's metadata plus an ``export`` section),
optionally the assistant (``sasrec.json``, ``sasrec.onnx``), and ``manifest.json`` (size and
sha256 of every other file). Checkpoint (``hatllm-edge train``): ``hatllm.json``,
``tokenizer.json``, ``catalog.jsonl``, ``adapter/`` (LoRA) or ``model.safetensors`` (full),
optionally the assistant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from hatllm_edge.core.errors import InputError

# --------------------------------------------------------------------------- graph contract

# The contract this engine reads; bump it when the contract changes, so that bundles built on
# first use are rebuilt rather than reused.
GRAPH_CONTRACT = 4  # 3: past_rows (the step gathers its cache rows), target_ids [B, Q, C]; 4: key_positions
# on graphs with sliding-window layers
# The revision of the graph hatllm_edge.export.graph writes: bumped when the graph changes within the
# contract (2: log-probs by LogSoftmax; 3: activation statistics for the int8 route), so cached
# bundles are rebuilt too.
GRAPH_REVISION = 3
# The revision of the graph engine.int8.int8_compute writes from a stored one: bumped when that
# rewrite changes (2: SmoothQuant folded in), so expanded graphs cached by an older engine are
# not reused.
INT8_REVISION = 2

# Keys of the graph's metadata_props that export writes and the engine reads back
META_LAYER_KINDS = "hatllm.layer_kinds"  # JSON list of mask kinds, one per layer
META_QUANT = "hatllm.quant"
META_DTYPE = "hatllm.dtype"
META_EMBEDDINGS = "hatllm.embeddings"
META_MODEL_TYPE = "hatllm.model_type"
_META_FILE_PREFIX, _META_FILE_SUFFIX = "hatllm.file.", ".sha256"


def file_digest_key(name: str) -> str:
    """The metadata key holding the sha256 of bundle file ``name`` the graph was exported with."""
    return f"{_META_FILE_PREFIX}{name}{_META_FILE_SUFFIX}"


def digest_key_file(key: str) -> str | None:
    """The bundle file a :func:`file_digest_key` key names; None for any other key."""
    if key.startswith(_META_FILE_PREFIX) and key.endswith(_META_FILE_SUFFIX):
        return key[len(_META_FILE_PREFIX): -len(_META_FILE_SUFFIX)]
    return None

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS_TO_KEEP = "logits_to_keep"
TARGET_IDS = "target_ids"
PAST_ROWS = "past_rows"
KEY_POSITIONS = "key_positions"  # only on graphs with sliding-window layers
LOGITS = "logits"
TARGET_LOGPROBS = "target_logprobs"
REQUIRED_INPUTS = (INPUT_IDS, POSITION_IDS, LOGITS_TO_KEEP, TARGET_IDS, PAST_ROWS)
MASK_INPUT = "mask_{}"  # .format(kind)
PAST = "past_key_values.{}.{}"  # .format(layer, "key" | "value")
PRESENT = "present.{}.{}"

# What an export chooses: the weight format of the decoder Linears (bundle.json export.quant, the
# graph's hatllm.quant), the float type, the embedding / LM head format and the int4 quantiser.
# The Literal types are the one list of names; the tuples are the same names for the CLI's choices.
Quant = Literal["int4", "nf4", "int8", "none"]
QUANTS: tuple[Quant, ...] = get_args(Quant)
DType = Literal["fp32", "fp16"]
DTYPES: tuple[DType, ...] = get_args(DType)
Embeddings = Literal["int8", "float"]
EMBEDDINGS: tuple[Embeddings, ...] = get_args(Embeddings)
Int4Algo = Literal["rtn", "hqq", "gptq"]
INT4_ALGOS: tuple[Int4Algo, ...] = get_args(Int4Algo)
Backend = Literal["onnx", "torch"]  # what ranks: the engine (a bundle), or PyTorch fp32 (a checkpoint)
BACKENDS: tuple[Backend, ...] = get_args(Backend)

# Model types that rank worse under 4-bit weights or per-token int8 activations, so that they
# export with int8 weights and run with activations quantised per block of 64 along K (the engine's
# int8-block route) unless told otherwise. Gemma 3 270M, first-round checkpoints on 100
# validation users (docs/training.md): int8 weights ranked as PyTorch fp32 on float and on
# block-wise activations (the latter 3.5x faster), lower on per-token activations and as int4.
INT8_WEIGHT_FAMILIES = ("gemma3_text",)


def default_quant(model_type: str | None) -> Quant:
    """The weights an export writes unless told: int4, or int8 for :data:`INT8_WEIGHT_FAMILIES`."""
    return "int8" if model_type in INT8_WEIGHT_FAMILIES else "int4"

# --------------------------------------------------------------------------- files

MODEL_FILE = "model.onnx"
BUNDLE_META = "bundle.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_META = "hatllm.json"
TOKENIZER_FILE = "tokenizer.json"
CATALOG_FILE = "catalog.jsonl"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"  # peft's file names inside ADAPTER_DIR
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"

# --------------------------------------------------------------------------- the assistant (SASRec)

SASREC_FORMAT = "hatllm-edge/sasrec"
ASSISTANT_CONFIG = "sasrec.json"
ASSISTANT_ONNX = "sasrec.onnx"
ASSISTANT_INPUT = "item_ids"  # [B, L] int64, catalog position + 1, left-padded with 0
ASSISTANT_OUTPUT = "scores"  # [B, num_items] log-probabilities, catalog order

# --------------------------------------------------------------------------- model metadata

META_FORMAT = 1
LEGACY_TEMPLATE = "instruct"  # the prompt template of metadata written before templates were named
FINETUNES = ("lora", "full")
SCHEDULE_FIELDS = ("num_layers", "n_in", "n_cr")


@dataclass(frozen=True)
class PromptMeta:
    """How prompts are built: the template, the history length, the end-of-item token and the
    begin token that opens every prompt (for a base that expects one, as Gemma does; None: no
    begin token). A section without ``template`` was written before the list template existed:
    "instruct"."""

    eos_token: str
    max_history: int = 20
    template: str = LEGACY_TEMPLATE
    bos_token: str | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> "PromptMeta":
        if not isinstance(raw, dict):
            raise InputError(f"{where}: prompt section missing or not an object")
        eos, history, template = raw.get("eos_token"), raw.get("max_history", 20), raw.get("template", LEGACY_TEMPLATE)
        bos = raw.get("bos_token")
        if (not isinstance(eos, str) or not _is_int(history) or history < 0 or not isinstance(template, str)
                or not (bos is None or isinstance(bos, str))):
            raise InputError(f"{where}: prompt section needs eos_token (string), max_history (integer >= 0), "
                             f"template (string) and optionally bos_token (string); got {json.dumps(raw)[:200]}")
        return cls(eos, history, template, bos)

    def to_dict(self) -> dict[str, Any]:
        out = {"template": self.template, "max_history": self.max_history, "eos_token": self.eos_token}
        return out | ({"bos_token": self.bos_token} if self.bos_token is not None else {})


@dataclass(frozen=True)
class Decoding:
    """How full-catalog lists and candidates are scored by default (``hatllm-edge fuse`` picks it
    on validation): renormalised over the trie's children or not, the assistant's weight, and
    ``shortlist``: with the assistant on, 0 searches the title tree with fused beam steps, N > 0
    scores the assistant's N most likely items exactly (:func:`~hatllm_edge.ranking.search.shortlist_search`).
    ``mixture``: the two models' probabilities mixed, ``assistant_weight`` then the assistant's
    share (between 0 and 1), over a shortlist (N > 0) that the LLM's own top items join; else
    the weighted sum of their log-probabilities (a product of experts)."""

    renormalise: bool = False
    assistant_weight: float = 0.0
    chosen_on: dict[str, Any] | None = None
    shortlist: int = 0
    mixture: bool = False

    @classmethod
    def parse(cls, raw: Any, where: str) -> "Decoding":
        if raw is None:
            return cls()
        weight = raw.get("assistant_weight", 0.0) if isinstance(raw, dict) else None
        shortlist = raw.get("shortlist", 0) if isinstance(raw, dict) else None
        mixture = raw.get("mixture", False) if isinstance(raw, dict) else None
        if (not isinstance(raw, dict) or not isinstance(raw.get("renormalise", False), bool)
                or not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0
                or not _is_int(shortlist) or shortlist < 0 or not isinstance(mixture, bool)
                or (mixture and not (0 < weight < 1 and shortlist > 0 and raw.get("renormalise") is True))):
            raise InputError(f"{where}: decoding section needs renormalise (true/false), assistant_weight "
                             f"(number >= 0) and optionally shortlist (integer >= 0) and mixture (true/false; true needs "
                             f"renormalise, a weight between 0 and 1 and a shortlist > 0); got {json.dumps(raw)[:200]}")
        return cls(raw.get("renormalise", False), float(weight), raw.get("chosen_on"), shortlist, mixture)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"renormalise": self.renormalise, "assistant_weight": self.assistant_weight}
        if self.shortlist:  # written only when set, so files from before it read back unchanged
            out["shortlist"] = self.shortlist
        if self.mixture:
            out["mixture"] = True
        return out if self.chosen_on is None else {**out, "chosen_on": self.chosen_on}


@dataclass
class ModelMeta:
    """``hatllm.json`` of a checkpoint, and ``bundle.json`` of a bundle (the same record plus
    ``export``). The sections the code relies on are typed and checked when read; the
    descriptive ones (``train``, ``data``, ``validation``, ``train_summary``, ``export``) stay
    plain JSON, and keys this version does not know are kept, so reading and writing again
    loses nothing."""

    schedule: dict[str, int]
    prompt: PromptMeta
    base: dict[str, Any] = field(default_factory=lambda: {"path": None, "gguf_file": None})
    model_type: str | None = None
    finetune: str = "lora"
    format: int = META_FORMAT
    train: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    train_summary: dict[str, Any] | None = None
    decoding: Decoding | None = None
    export: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any, where: str) -> "ModelMeta":
        """From parsed JSON; InputError names ``where`` and the section that is wrong."""
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        schedule = raw.get("schedule")
        if not (isinstance(schedule, dict) and set(schedule) == set(SCHEDULE_FIELDS)
                and all(_is_int(v) and v >= 0 for v in schedule.values())):
            raise InputError(f"{where}: schedule section needs integers {', '.join(SCHEDULE_FIELDS)}; "
                             f"got {json.dumps(schedule)[:200]}")
        base = raw.get("base", {"path": None, "gguf_file": None})
        if not isinstance(base, dict):
            raise InputError(f"{where}: base section is not an object")
        if raw.get("finetune", "lora") not in FINETUNES:
            raise InputError(f"{where}: finetune {raw.get('finetune')!r}, expected one of {FINETUNES}")
        for name in ("train", "data", "validation", "train_summary", "export"):
            if raw.get(name) is not None and not isinstance(raw[name], dict):
                raise InputError(f"{where}: {name} section is not an object")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(schedule=dict(schedule), prompt=PromptMeta.parse(raw.get("prompt"), where), base=base,
                   model_type=raw.get("model_type"), finetune=raw.get("finetune", "lora"),
                   format=raw.get("format", META_FORMAT), train=raw.get("train"), data=raw.get("data"),
                   validation=raw.get("validation"), train_summary=raw.get("train_summary"),
                   decoding=Decoding.parse(raw["decoding"], where) if raw.get("decoding") is not None else None,
                   export=raw.get("export"), extra={k: v for k, v in raw.items() if k not in known})

    @classmethod
    def read(cls, path: Path) -> "ModelMeta":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise InputError(f"{path} is not readable JSON ({' '.join(str(e).split())[:200]})") from None
        return cls.parse(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {"format": self.format, "base": self.base, "model_type": self.model_type, "schedule": self.schedule,
               "prompt": self.prompt.to_dict(), "finetune": self.finetune, "train": self.train, "data": self.data,
               "validation": self.validation, "train_summary": self.train_summary,
               "decoding": self.decoding.to_dict() if self.decoding else None, "export": self.export, **self.extra}
        return {k: v for k, v in out.items() if v is not None}

    def write(self, path: Path) -> None:
        """Written whole to a temporary file, then renamed: a reader never sees half of it."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
