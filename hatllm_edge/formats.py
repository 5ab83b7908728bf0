"""Every format the project writes and reads, in one torch-free place: the engine's graph
contract, the bundle and checkpoint layouts, and the collaborative assistant's files. The
exporter and the engine both import these names, so a format changes here, once.

Graph contract (written by :mod:`export.graph`, read by :mod:`hatllm_edge.engine`):

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

# --------------------------------------------------------------------------- graph contract

# The contract this engine reads; bump it when the contract changes, so that bundles built on
# first use are rebuilt rather than reused.
GRAPH_CONTRACT = 2
# The revision of the graph export.graph writes: bumped when the graph changes within the
# contract (2: log-probs by LogSoftmax; 3: activation statistics for the int8 route), so cached
# bundles are rebuilt too.
GRAPH_REVISION = 3
# The revision of the graph lowbit.int8_compute writes from a stored one: bumped when that
# rewrite changes (2: SmoothQuant folded in), so expanded graphs cached by an older engine are
# not reused.
INT8_REVISION = 2

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS_TO_KEEP = "logits_to_keep"
TARGET_IDS = "target_ids"
LOGITS = "logits"
TARGET_LOGPROBS = "target_logprobs"
REQUIRED_INPUTS = (INPUT_IDS, POSITION_IDS, LOGITS_TO_KEEP, TARGET_IDS)
MASK_INPUT = "mask_{}"  # .format(kind)
PAST = "past_key_values.{}.{}"  # .format(layer, "key" | "value")
PRESENT = "present.{}.{}"

# --------------------------------------------------------------------------- files

MODEL_FILE = "model.onnx"
BUNDLE_META = "bundle.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_META = "hatllm.json"
TOKENIZER_FILE = "tokenizer.json"
CATALOG_FILE = "catalog.jsonl"
ADAPTER_DIR = "adapter"
FULL_WEIGHTS = "model.safetensors"

# --------------------------------------------------------------------------- the assistant (SASRec)

SASREC_FORMAT = "hatllm-edge/sasrec"
ASSISTANT_CONFIG = "sasrec.json"
ASSISTANT_ONNX = "sasrec.onnx"
ASSISTANT_INPUT = "item_ids"  # [B, L] int64, catalog position + 1, left-padded with 0
ASSISTANT_OUTPUT = "scores"  # [B, num_items] log-probabilities, catalog order
