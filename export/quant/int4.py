"""int4 ``com.microsoft.MatMulNBits`` through ONNX Runtime's ``MatMulNBitsQuantizer`` on the
finished float graph: RTN (ORT's default block-wise affine quantiser), HQQ, or GPTQ (needs
calibration prompts, fed with their HatLLM masks). Read back by :mod:`hatllm_edge.engine.quant.nbits`."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization.calibrate import CalibrationDataReader

from hatllm_edge.core.formats import Int4Algo
from hatllm_edge.core.masks import build_masks, causal_visibility

Sequence = tuple[np.ndarray, np.ndarray]  # (token ids, segment ids) of one prompt, as export.calibrate builds them


@dataclass(frozen=True)
class Int4Options:
    """MatMulNBits settings. ``calibration``: GPTQ's prompts, (token ids, segment ids) each [T] int64
    (export_bundle builds them from the bundle's tokenizer and catalog when GPTQ is asked for).
    ``accuracy_level`` None keeps float32 activations (4 would quantise them to int8 on CPU).
    ``eight_bit``: Linears kept at 8 bits (names as in ``LINEARS``, e.g. ``mlp.down_proj``)."""

    algo: Int4Algo = "rtn"
    block_size: int = 16
    symmetric: bool = False
    accuracy_level: int | None = None
    calibration: tuple[Sequence, ...] = ()
    eight_bit: tuple[str, ...] = ("mlp.down_proj",)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_type": "int4", "algo": self.algo, "block_size": self.block_size,
                "symmetric": self.symmetric, "accuracy_level": self.accuracy_level, "eight_bit": list(self.eight_bit),
                "calibration_prompts": len(self.calibration) if self.algo == "gptq" else None}


class _TokenReader(CalibrationDataReader):
    """GPTQ calibration feeds: each prompt as a one-row first step (empty cache), every mask
    input the kind it names (:func:`~hatllm_edge.core.masks.build_masks`), as the engine feeds it."""

    def __init__(self, model: onnx.ModelProto, sequences: tuple[Sequence, ...]) -> None:
        self.inputs = [(i.name, i.type.tensor_type) for i in model.graph.input]
        self.sequences = sequences
        self.position = 0  # an index, not a generator: the quantiser deep-copies the reader

    def rewind(self) -> None:
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.sequences):
            return None
        self.position += 1
        return self._feed(self.sequences[self.position - 1])

    def _feed(self, sequence: Sequence) -> dict[str, np.ndarray]:
        tokens, segments = sequence
        t = len(tokens)
        segs = np.asarray(segments, np.int64)[None]
        masks = build_masks(segs, segs, causal_visibility(np.ones((1, t), bool), t))
        feed: dict[str, np.ndarray] = {}
        for name, tt in self.inputs:
            if name == "input_ids":
                feed[name] = np.asarray(tokens, np.int64)[None]
            elif name == "target_ids":
                feed[name] = np.asarray(tokens, np.int64)[None, :, None]
            elif name == "past_rows":
                feed[name] = np.zeros(1, np.int64)
            elif name in ("position_ids", "key_positions"):  # no cache: the keys are the queries
                feed[name] = np.arange(t, dtype=np.int64)[None]
            elif name == "logits_to_keep":
                feed[name] = np.array(0, np.int64)
            elif name.startswith("mask_"):
                feed[name] = masks[name.removeprefix("mask_")]
            else:  # empty past [1, kv, 0, D]
                dims = tt.shape.dim
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                feed[name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), dtype)
        return feed


def quantize_int4(model: onnx.ModelProto, options: Int4Options) -> onnx.ModelProto:
    """Every MatMul with a constant weight (the decoder Linears) -> MatMulNBits."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from hatllm_edge.core.errors import InputError

    if options.algo == "rtn":
        config: Any = mnq.DefaultWeightOnlyQuantConfig(
            block_size=options.block_size, is_symmetric=options.symmetric, accuracy_level=options.accuracy_level)
    elif options.algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4)
    elif options.algo == "gptq":
        if not options.calibration:
            raise InputError("int4 GPTQ needs calibration prompts: export a checkpoint (its bundle carries the tokenizer "
                             "and catalog they are built from) or pass Int4Options.calibration")
        config = mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_TokenReader(model, options.calibration), block_size=options.block_size)
    else:
        raise InputError(f"int4 algo {options.algo!r}: expected rtn, hqq or gptq")
    quantizer = mnq.MatMulNBitsQuantizer(
        model, bits=4, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, algo_config=config)
    level = logging.getLogger("onnxruntime.quantization").level
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        with contextlib.redirect_stdout(sys.stderr):  # GPTQ prints a progress bar: stdout is the command's JSON
            quantizer.process()
    finally:
        logging.getLogger("onnxruntime.quantization").setLevel(level)
    return quantizer.model.model
