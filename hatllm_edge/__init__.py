"""hatllm-edge: HatLLM fine-tuning, 4-bit ONNX export and an ONNX Runtime ranking engine.

Layers, lowest first (each imports only those before it; ``tests/test_layers.py`` holds them to it):
``core`` (formats, masks, prompts, data, metrics) -> ``engine`` (ONNX Runtime sessions, low-bit
weights, caches) -> ``ranking`` (beam search, candidate scoring, the ranker) -> ``training``
(torch) -> ``export`` (ONNX, quantisation) -> ``app`` (rank and serve) -> ``evaluation``,
``bench`` -> ``cli``.
"""

__version__ = "0.1.0"
