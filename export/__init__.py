"""HatLLM -> ONNX: graph (:mod:`hatllm_edge.export.graph`), conversion (:mod:`hatllm_edge.export.convert`), 4-bit
weights (:mod:`hatllm_edge.export.quant`), parity with PyTorch (:mod:`hatllm_edge.export.validate`) and the
self-describing bundle (:mod:`hatllm_edge.export.bundle`)."""

from hatllm_edge.engine.bundle import verify_bundle
from hatllm_edge.export.bundle import export_bundle, write_manifest
from hatllm_edge.export.convert import export_onnx, read_decoder
from hatllm_edge.export.quant.int4 import Int4Options
from hatllm_edge.export.validate import ValidationReport, validate

__all__ = ["Int4Options", "ValidationReport", "export_bundle", "export_onnx", "read_decoder", "validate",
           "verify_bundle", "write_manifest"]
