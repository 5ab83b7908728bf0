"""CUDA graphs (hatllm_edge.engine.cuda_graph): each pass shape replayed from buffers that stay put.

Capture itself needs a GPU (the CUDA test skips without one). What the CPU can check is the
bookkeeping around it, run with the same bound buffers and no capture: padded rows and target
axes dropped again, each step's cache read from the previous graph's own buffers, graphs
reused across requests, and rankings equal to plain runs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_llama_config
from test_invariance import CATALOG, HISTORIES, TITLES
from transformers import LlamaForCausalLM

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.masks import LayerSchedule
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.engine.cuda_graph import GraphRunner, pad_rows, padded
from hatllm_edge.engine.session import OnnxBackend
from hatllm_edge.export import export_onnx
from hatllm_edge.ranking.candidates import score_candidates
from hatllm_edge.ranking.search import beam_search
from hatllm_edge.ranking.trie import TitleTrie
from hatllm_edge.training.model import HatLLM

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(layers=4, hidden=64, init=0.2)).eval()
    return export_onnx(HatLLM(lm, LayerSchedule(4, 1, 1)), tmp_path_factory.mktemp("graphs") / "model.onnx", quant="int4")


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Gemma3 graph whose local layer's 16-position window is shorter than the prompts: its
    key_positions input is padded with the rest of a graph's rows."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"], initializer_range=0.2)
    lm = Gemma3ForCausalLM(cfg).eval()
    return export_onnx(HatLLM(lm, LayerSchedule(2, 1, 1)), tmp_path_factory.mktemp("gemma") / "model.onnx", quant="int8")


def test_padding_helpers() -> None:
    assert [padded(n) for n in (1, 2, 3, 5, 8, 9, 100)] == [1, 2, 4, 8, 8, 16, 128]
    a = np.arange(6).reshape(3, 2)
    assert pad_rows(a, 3) is a
    np.testing.assert_array_equal(pad_rows(a, 5), [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]])
    np.testing.assert_array_equal(pad_rows(a, 4, axis=1), [[0, 1, 0, 0], [2, 3, 2, 2], [4, 5, 4, 4]])


@pytest.mark.parametrize("graph", ["onnx_path", "gemma_path"])
def test_bound_buffers_rank_like_plain_runs(graph: str, prompts: PromptBuilder, request: pytest.FixtureRequest) -> None:
    onnx_path = request.getfixturevalue(graph)
    plain = OnnxBackend(onnx_path, threads=2, compute="native")
    bound = OnnxBackend(onnx_path, threads=2, compute="native")
    bound._graphs = GraphRunner(bound.session, "cpu", capture=False)
    trie = TitleTrie.build(CATALOG, prompts)
    rng = random.Random(0)
    lists = [rng.sample(TITLES, 9) for _ in HISTORIES]
    for renormalise in (None, trie):
        want = score_candidates(plain, prompts, HISTORIES, lists, pack_tokens=24, renormalise=renormalise)
        got = score_candidates(bound, prompts, HISTORIES, lists, pack_tokens=24, renormalise=renormalise)
        for w, g in zip(want, got):
            assert w.items == g.items
            np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-4)
    want = beam_search(plain, prompts, trie, HISTORIES, k=4, beams=5)
    for _ in range(2):  # the second request replays the first one's graphs
        got = beam_search(bound, prompts, trie, HISTORIES, k=4, beams=5)
        for w, g in zip(want, got):
            assert w.items == g.items
            np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-4)
    graphs = bound._graphs
    assert graphs.replays == bound.runs and len(graphs._graphs) < graphs.replays  # shapes reused, none run plainly


def test_graph_limit_falls_back_to_plain_runs(onnx_path: Path, prompts: PromptBuilder) -> None:
    bound = OnnxBackend(onnx_path, threads=2, compute="native")
    bound._graphs = GraphRunner(bound.session, "cpu", capture=False, limit=1)
    trie = TitleTrie.build(CATALOG, prompts)
    got = beam_search(bound, prompts, trie, HISTORIES[:2], k=3, beams=3)
    want = beam_search(OnnxBackend(onnx_path, threads=2, compute="native"), prompts, trie, HISTORIES[:2], k=3, beams=3)
    assert [g.items for g in got] == [w.items for w in want]
    assert len(bound._graphs._graphs) == 1 and bound._graphs.replays < bound.runs


def test_cuda_graph_needs_cuda(onnx_path: Path) -> None:
    with pytest.raises(InputError, match="CUDA graphs need --device cuda"):
        OnnxBackend(onnx_path, cuda_graph=True)


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_captured_graphs_rank_like_plain_cuda_runs(onnx_path: Path, prompts: PromptBuilder) -> None:
    plain = OnnxBackend(onnx_path, device="cuda")
    graphed = OnnxBackend(onnx_path, device="cuda", cuda_graph=True)
    trie = TitleTrie.build(CATALOG, prompts)
    want = beam_search(plain, prompts, trie, HISTORIES, k=4, beams=5)
    for _ in range(3):  # capture, then replays
        got = beam_search(graphed, prompts, trie, HISTORIES, k=4, beams=5)
        assert [g.items for g in got] == [w.items for w in want]
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-3)
