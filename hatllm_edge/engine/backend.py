"""The contract every ranking backend meets (PyTorch or ONNX Runtime).

Ranking (beam search over the title tree, candidate scoring) is written once against this
protocol; arrays at the boundary are NumPy so that the engine needs no torch at run time.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, get_args

import numpy as np

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import INT8_WEIGHT_FAMILIES
from hatllm_edge.core.masks import MaskKind

# What a caller may ask of a backend, whichever runs it (defined here, below ranking and
# training, so that neither needs the ONNX Runtime session module for a type).
Compute = Literal["auto", "native", "int8", "int8-block", "int8-tensor"]
# The routes a user may pick. "int8-tensor" (one activation scale per batch tensor) is kept for
# the benchmark's ablation only: by design a user's scores there depend on who shares the batch.
COMPUTES: tuple[Compute, ...] = ("auto", "native", "int8", "int8-block")
Optimization = Literal["all", "basic", "none"]
Device = Literal["cpu", "cuda"]
DEVICES: tuple[Device, ...] = get_args(Device)
PASS_TOKENS_CPU = 4096  # rows x width of one candidate pass on the CPU (docs/results.md)
PASS_TOKENS_CUDA = 32768  # on a GPU: 32 users x 100 candidates (~41k padded tokens) in two passes
PASS_VOCAB = 49152  # the vocabulary (SmolLM2's) those two were measured with


def pass_tokens(device: str, vocab_size: int) -> int:
    """Tokens (rows x width) one candidate pass may hold on ``device``: the tuned budget, cut
    for a larger vocabulary so that a pass's [tokens, V] float32 logits and their log-softmax
    stay the size they had where it was tuned (4,096 x 49,152 x 2 floats, 1.6 GB on the CPU).
    Gemma 3's 262,144 tokens would need 8.6 GB a CPU pass; they get 768 tokens."""
    budget = PASS_TOKENS_CUDA if device == "cuda" else PASS_TOKENS_CPU
    return budget * PASS_VOCAB // max(vocab_size, PASS_VOCAB)


class Backend(Protocol):
    """A causal LM that runs one forward step with per-kind masks and a KV cache.

    ``rows`` [B] int64 names, for each row of a step, the row of ``cache`` it continues (a
    beam's parent, a candidate row's user); None is the identity. The backend gathers them as
    part of the step, so reordering never costs a pass of its own.
    """

    runs: int  # passes run so far (bench reports them per request)
    label: str  # what runs, in results and logs: onnx-<quant>-<dtype>-<device>-<compute> or torch-<fp32|bf16|nf4>

    @property
    def exact_layout(self) -> bool:
        """True when a result may move with the padding around it, so that batches must join
        only prompts of one width (:func:`hatllm_edge.ranking.prefill.prompt_width`)."""
        ...

    pass_tokens: int  # tokens (rows x width) one candidate-scoring pass may hold

    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: Any | None,
        last_only: bool = False,
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Any]:
        """One step.

        input_ids, position_ids: [B, Q] int64. masks: kind -> bool [B, 1, Q, P + Q], where P
        is the number of cached tokens (0 when ``cache`` is None). Returns float32 logits,
        [B, Q, V] or [B, V] (last position only) when ``last_only``, and the cache that now
        holds B rows of P + Q tokens.
        """
        ...

    def token_logprobs(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: Any | None,
        targets: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Any]:
        """Like :meth:`forward`, but returns log p(targets[b, q]) at every position, [B, Q]
        (or [B, Q, C] for targets [B, Q, C]: several tokens per position) float32: what
        candidate scoring needs, without handing back [B, Q, V] logits."""
        ...


def cache_rows(rows: np.ndarray | None, batch: int, cached: int | None) -> np.ndarray:
    """``past_rows`` for a step of ``batch`` rows over a cache of ``cached`` rows (None: no
    cache yet): ``rows`` checked, or the identity. Shared by every backend."""
    if rows is None:
        if cached is not None and cached != batch:
            raise InputError(f"the cache holds {cached} rows, the step has {batch}; pass the cache rows it continues")
        return np.arange(batch, dtype=np.int64) if cached is not None else np.zeros(batch, np.int64)
    idx = np.ascontiguousarray(rows, np.int64).reshape(-1)
    if len(idx) != batch:
        raise InputError(f"rows has {len(idx)} entries for a step of {batch} rows")
    if cached is None:
        raise InputError("rows given for a step without a cache")
    if idx.size and (idx.min() < 0 or idx.max() >= cached):
        raise InputError(f"cache rows out of range for a cache of {cached} rows: {idx.tolist()[:8]}")
    return idx


def key_positions(cached: np.ndarray | None, rows: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """[B, P + Q] int64: the positions of the keys a step attends, its cache rows' (``cached``
    [B_past, P] gathered by ``rows``, see :func:`cache_rows`) then its queries'. Every backend
    keeps them beside its cache: a sliding-window layer counts back on positions, and beam
    search and candidate scoring lay continuations side by side, so columns run ahead of them."""
    queries = np.ascontiguousarray(position_ids, np.int64)
    return queries if cached is None else np.concatenate([cached[rows], queries], axis=1)


def resolve_compute(compute: Compute, device: str, quant: str, model_type: str | None = None) -> Compute:
    """What "auto" means for a graph of ``quant`` weights: on the CPU int8, or int8-block for
    int4/int8 weights of a model type in :data:`~hatllm_edge.core.formats.INT8_WEIGHT_FAMILIES`;
    the graph as stored for float weights or on a GPU."""
    if compute != "auto":
        return compute
    if quant == "none" or device != "cpu":
        return "native"
    return "int8-block" if model_type in INT8_WEIGHT_FAMILIES and quant in ("int4", "int8") else "int8"
