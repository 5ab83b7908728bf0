"""CUDA graphs for the engine: a pass replayed as one captured graph instead of ~600 kernel
launches from the host, which is what bounds a request on a GPU (docs/design.md).

ONNX Runtime (``enable_cuda_graph``) replays a captured graph against the device addresses it
was captured with. So a graph (its ``gpu_graph_id``) is kept per *signature*: the shapes of
the pass and the address of the cache it reads. Each graph owns its input and output buffers:
host inputs are copied into them (``update_inplace``) before a replay, and its outputs stay in
its own buffers, so a step's cache is the buffers of the graph before it, the very addresses
the next graph was captured over. Rows are padded to a power of two and the target axis too,
so a beam search's shrinking batch and renormalised passes reuse a few graphs. New signatures
past ``limit`` graphs or ``max_bytes`` of output buffers run as plain passes: captured graphs
cannot be freed one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

GRAPH_LIMIT = 64  # captured graphs per session (each holds its own input and output buffers)
GRAPH_BYTES = 8 << 30  # their output buffers in all (a 16k-token pass alone holds 3.2 GB of logits)


def padded(n: int) -> int:
    """The power of two >= n that a graph's row (or target) axis is padded to."""
    return 1 << max(0, (n - 1).bit_length())


def pad_rows(a: np.ndarray, rows: int, axis: int = 0) -> np.ndarray:
    """``a`` with copies of its first entry along ``axis`` up to ``rows``: padding that is a
    valid input (a copy of row 0 attends where row 0 does), whose outputs are dropped."""
    extra = rows - a.shape[axis]
    if extra <= 0:
        return a
    first = np.take(a, [0] * extra, axis=axis)
    return np.concatenate([a, first], axis=axis)


@dataclass
class _Captured:
    graph_id: int
    bind: Any  # the IOBinding, kept: its addresses are the graph's
    inputs: dict[str, Any]  # host-fed input name -> its device OrtValue
    outputs: list[Any]  # device OrtValues in the session's output order
    options: Any  # RunOptions naming gpu_graph_id
    owned: list[Any]  # buffers bound only here (a first pass's empty cache), kept alive with the graph


class GraphRunner:
    """Runs passes of one session through captured graphs (``capture``: CUDA; without it the
    same bound-buffer bookkeeping runs as plain passes, which is how the CPU tests it)."""

    def __init__(self, session: Any, device: str, device_id: int = 0, capture: bool = True,
                 limit: int = GRAPH_LIMIT, max_bytes: int = GRAPH_BYTES) -> None:
        self.session, self.device, self.device_id, self.capture = session, device, device_id, capture
        self.limit, self.max_bytes, self.bytes = limit, max_bytes, 0
        self._graphs: dict[tuple[Any, ...], _Captured] = {}
        self.replays = 0

    def run(self, feeds: dict[str, np.ndarray], past: Sequence[tuple[str, Any]],
            outputs: Sequence[tuple[str, tuple[int, ...], Any]]) -> list[Any] | None:
        """One pass: ``feeds`` host arrays; ``past`` (input name, OrtValue on the device or an
        empty host array); ``outputs`` (name, shape, NumPy dtype) in the session's order.
        Returns the output OrtValues (the graph's own buffers, valid until its next replay),
        or None when a new signature would pass ``limit`` or ``max_bytes`` (run it plainly)."""
        key = (tuple((n, a.shape, a.dtype.str) for n, a in feeds.items()),
               tuple((n, v.shape, v.dtype.str) if isinstance(v, np.ndarray) else (n, tuple(v.shape()), v.data_ptr())
                     for n, v in past))
        graph = self._graphs.get(key)
        if graph is None:
            size = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, dtype in outputs)
            if len(self._graphs) >= self.limit or self.bytes + size > self.max_bytes:
                return None
            graph = self._new(len(self._graphs) + 1, feeds, past, outputs)
            self._graphs[key] = graph
            self.bytes += size
        for name, array in feeds.items():
            graph.inputs[name].update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(graph.bind, graph.options)
        self.replays += 1
        return graph.outputs

    def _new(self, graph_id: int, feeds: dict[str, np.ndarray], past: Sequence[tuple[str, Any]],
             outputs: Sequence[tuple[str, tuple[int, ...], Any]]) -> _Captured:
        import onnxruntime as ort

        bind = self.session.io_binding()
        inputs = {}
        for name, array in feeds.items():
            inputs[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)
            bind.bind_ortvalue_input(name, inputs[name])
        owned = []
        for name, value in past:
            if isinstance(value, np.ndarray):  # the empty cache of a first pass: a buffer of the graph's own
                value = ort.OrtValue.ortvalue_from_numpy(value, self.device, self.device_id)
                owned.append(value)
            bind.bind_ortvalue_input(name, value)
        out = []
        for name, shape, dtype in outputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)
            bind.bind_ortvalue_output(name, value)
            out.append(value)
        options = ort.RunOptions()
        if self.capture:
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return _Captured(graph_id, bind, inputs, out, options, owned)
