"""HatLLM -> ONNX: graph (:mod:`export.graph`), conversion (:mod:`export.convert`), 4-bit
weights (:mod:`export.quantize`), parity with PyTorch (:mod:`export.validate`) and the
self-describing bundle (:mod:`export.bundle`)."""

from export.bundle import export_bundle, write_manifest
from export.convert import export_onnx, read_decoder
from export.quantize import Int4Options
from export.validate import ValidationReport, validate
from hatllm_edge.engine import verify_bundle

__all__ = ["Int4Options", "ValidationReport", "export_bundle", "export_onnx", "read_decoder", "validate",
           "verify_bundle", "write_manifest"]
