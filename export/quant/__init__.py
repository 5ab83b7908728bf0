"""Quantisation, one module per weight format (:mod:`.nf4`, :mod:`.int4`; the 8-bit blocks are
:mod:`hatllm_edge.engine.quant.q8`, which the engine needs too). Each format's decoder lives in
:mod:`hatllm_edge.engine.quant`, because the torch-free engine reads the weights at load time."""
