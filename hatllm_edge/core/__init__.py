"""The base layer: formats, errors, masks, prompts, data, metrics, limits. NumPy and tokenizers only: no torch, no ONNX Runtime."""
