"""The ONNX Runtime engine: sessions over a bundle's graph, low-bit weights read back and rewritten to int8, the caches, CUDA graphs. No torch."""
