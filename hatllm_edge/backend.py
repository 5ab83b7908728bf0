"""The contract every ranking backend meets (PyTorch or ONNX Runtime).

Ranking (beam search over the title tree, candidate scoring) is written once against this
protocol; arrays at the boundary are NumPy so that the engine needs no torch at run time.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from hatllm_edge.masks import MaskKind


class Backend(Protocol):
    """A causal LM that runs one forward step with per-kind masks and a KV cache."""

    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: Any | None,
        last_only: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """One step.

        input_ids, position_ids: [B, Q] int64. masks: kind -> bool [B, 1, Q, P + Q], where P
        is the number of cached tokens (0 when ``cache`` is None). Returns float32 logits,
        [B, Q, V] or [B, V] (last position only) when ``last_only``, and the cache that now
        holds P + Q tokens.
        """
        ...

    def token_logprobs(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: Any | None,
        targets: np.ndarray,
    ) -> tuple[np.ndarray, Any]:
        """Like :meth:`forward`, but returns log p(targets[b, q]) at every position, [B, Q]
        float32: what candidate scoring needs, without handing back [B, Q, V] logits."""
        ...

    def select(self, cache: Any, index: np.ndarray) -> Any:
        """The cache with its batch rows gathered by ``index`` [B'] (beam reorder/expand)."""
        ...
