"""A user's result depends on its own request alone: not on who shares the batch (prompts of
other lengths), nor on the order of its candidates, nor on copies of one candidate.

On the engine's int8 route a last-bit difference anywhere upstream (attention summed over
another key length) can move a per-token int8 code, and layers grow that into nats; the
ranking code gives every user the same layout in any company, so the int8 route must agree
to the bit, and the float routes to float rounding."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.masks import LayerSchedule
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.engine.session import OnnxBackend
from hatllm_edge.export import export_onnx
from hatllm_edge.ranking.candidates import score_candidates
from hatllm_edge.ranking.prefill import PROMPT_BUCKET, by_width, prompt_width
from hatllm_edge.ranking.search import beam_search
from hatllm_edge.ranking.trie import TitleTrie
from hatllm_edge.training.model import HatLLM

TITLES = [f"{name} ({year})" for name, year in [
    ("Star Wars", 1977), ("Alien", 1979), ("Aliens", 1986), ("Heat", 1995), ("Fargo", 1996), ("Babe", 1995),
    ("Toy Story", 1995), ("Toy Story 2", 1999), ("Twelve Monkeys", 1995), ("Casablanca", 1942),
    ("Vertigo", 1958), ("Jaws", 1975), ("Brazil", 1985), ("Seven", 1995), ("Ran", 1985), ("Clerks", 1994),
]]
CATALOG = Catalog(tuple(f"i{n}" for n in range(len(TITLES))), tuple(TITLES))
# prompts of several lengths: some share a padded width, most do not
HISTORIES = [TITLES[:1], TITLES[2:9], TITLES[5:7], TITLES[1:12], TITLES[9:10], TITLES[3:8]]
TOL = {"int8": 0.0, "native": 1e-4}  # the int8 route is exact by construction; float kernels may differ with the row count


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(layers=4, hidden=64, init=0.2)).eval()
    return export_onnx(HatLLM(lm, LayerSchedule(4, 1, 1)), tmp_path_factory.mktemp("invariance") / "model.onnx", quant="int4")


@pytest.fixture(scope="module", params=["int8", "native"])
def engine(request: pytest.FixtureRequest, onnx_path: Path) -> OnnxBackend:
    return OnnxBackend(onnx_path, threads=2, compute=request.param)


def _scores(ranked) -> dict[int, float]:  # type: ignore[no-untyped-def]
    return dict(zip(ranked.items, ranked.scores))


def test_prompt_widths_depend_on_the_prompt_alone(prompts: PromptBuilder) -> None:
    encoded = [prompts.prompt(h) for h in HISTORIES]
    widths = [prompt_width(len(p)) for p in encoded]
    assert all(w % PROMPT_BUCKET == 0 and len(p) <= w < len(p) + PROMPT_BUCKET for w, p in zip(widths, encoded))
    groups = by_width(encoded)
    assert sorted(i for g in groups for i in g) == list(range(len(encoded)))
    assert all(len({widths[i] for i in g}) == 1 for g in groups)
    assert len(groups) < len(encoded) < 2 * len(groups) + 2  # the fixture mixes shared and lone widths


def test_candidate_scores_batched_equal_alone(engine: OnnxBackend, prompts: PromptBuilder) -> None:
    rng = random.Random(0)
    lists = [rng.sample(TITLES, 9) for _ in HISTORIES]
    together = score_candidates(engine, prompts, HISTORIES, lists, pack_tokens=24, pass_tokens=96)
    for history, titles, got in zip(HISTORIES, lists, together):
        alone = score_candidates(engine, prompts, [history], [titles], pack_tokens=24, pass_tokens=96)[0]
        assert got.items == alone.items
        np.testing.assert_allclose(got.scores, alone.scores, rtol=0, atol=TOL[engine.compute])


def test_candidate_order_and_copies_change_no_score(engine: OnnxBackend, prompts: PromptBuilder) -> None:
    titles = TITLES[:10]
    base = _scores(score_candidates(engine, prompts, [HISTORIES[1]], [titles], pack_tokens=24)[0])
    for seed in range(3):
        order = random.Random(seed).sample(range(len(titles)), len(titles))
        shuffled = _scores(score_candidates(engine, prompts, [HISTORIES[1]], [[titles[i] for i in order]], pack_tokens=24)[0])
        got = np.asarray([shuffled[order.index(i)] for i in range(len(titles))])
        np.testing.assert_allclose(got, [base[i] for i in range(len(titles))], rtol=0, atol=TOL[engine.compute])
    copies = score_candidates(engine, prompts, [HISTORIES[1]], [[titles[3]] * 4 + titles[:3]], pack_tokens=24)[0]
    by_item = _scores(copies)
    assert len({by_item[i] for i in range(4)}) == 1  # four copies, one score
    assert by_item[0] == pytest.approx(base[3], abs=TOL[engine.compute])


def test_top_k_batched_equals_alone(engine: OnnxBackend, prompts: PromptBuilder) -> None:
    trie = TitleTrie.build(CATALOG, prompts)
    for k, beams in ((8, 8), (3, 5)):
        together = beam_search(engine, prompts, trie, HISTORIES, k=k, beams=beams)
        for history, got in zip(HISTORIES, together):
            alone = beam_search(engine, prompts, trie, [history], k=k, beams=beams)[0]
            assert got.items == alone.items
            np.testing.assert_allclose(got.scores, alone.scores, rtol=0, atol=TOL[engine.compute])


def test_the_shipped_assistant_gives_a_user_the_same_log_probs_in_any_batch() -> None:
    """The fused score's other half: SASRec's ONNX graph, run for a batch of users (as evaluate
    and fuse do) or for one (as rank does), gives each user the same log-probabilities to the bit."""
    from hatllm_edge.app.models import default_checkpoint
    from hatllm_edge.core.data import load_dataset
    from hatllm_edge.ranking.assistant import Assistant

    data = load_dataset("ml-100k", None, None)
    assistant = Assistant.open(default_checkpoint(), data.catalog, threads=2)
    histories = [seq[: 3 + n * 7 % 60] for n, seq in enumerate(list(data.sequences.values())[:24])]  # lengths 3-62
    batch = assistant.logprobs(histories)
    alone = np.stack([assistant.logprobs([h])[0] for h in histories])
    assert np.array_equal(batch, alone)
    assert np.allclose(np.exp(batch).sum(axis=1), 1.0)


def test_native_routes_run_a_request_as_one_batch(engine: OnnxBackend, prompts: PromptBuilder) -> None:
    """Native arithmetic runs every user of a request in one prefill and the fewest candidate
    passes that the backend's pass size allows (all rows padded to one width); the int8 route
    keeps one batch per prompt width, the layout that makes it exact. A beam step is one run
    (its cache rows gathered inside it)."""
    rng = random.Random(1)
    lists = [rng.sample(TITLES, 12) for _ in HISTORIES]
    widths = len(by_width([prompts.prompt(h) for h in HISTORIES]))
    before = engine.runs
    score_candidates(engine, prompts, HISTORIES, lists, pack_tokens=24)
    runs = engine.runs - before
    if engine.compute == "native":
        assert runs == 2  # one prefill, one pass: the request's tokens fit the CPU's pass size
    else:
        assert runs >= 2 * widths > 2

    class Prefills:
        def __init__(self) -> None:
            self.prefills = 0

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(engine, name)

        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.prefills += args[3] is None
            return engine.forward(*args, **kwargs)

    counted, trie = Prefills(), TitleTrie.build(CATALOG, prompts)
    before = engine.runs
    beam_search(counted, prompts, trie, HISTORIES, k=3, beams=4)  # type: ignore[arg-type]
    steps = engine.runs - before - counted.prefills
    assert counted.prefills == (1 if engine.compute == "native" else widths)
    longest = max(len(prompts.title_ids(t)) for t in TITLES) + len(prompts.end_ids)
    assert 0 < steps <= longest * counted.prefills  # a run per step of each batch's search, no reorder runs


def test_a_beam_step_runs_one_row_per_user_over_one_prompt_copy(engine: OnnxBackend, prompts: PromptBuilder) -> None:
    """Beam search's tree layout: a step passes one row per user still searching, its
    hypotheses as that row's query positions (``beams`` of them on the exact int8 route, so a
    row's key columns never depend on its company), and the row's cache grows by those
    columns: the prompt is held once per user, never once per hypothesis."""
    steps: list[tuple[int, int, int, int] | None] = []  # (rows, queries, cached columns, cache rows); None: a prefill

    class Recorder:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(engine, name)

        def forward(self, ids, positions, masks, cache, last_only=False, rows=None):  # type: ignore[no-untyped-def]
            assert cache is None  # the prefill; a step reads only its hypotheses' allowed tokens
            steps.append(None)
            return engine.forward(ids, positions, masks, cache, last_only=last_only, rows=rows)

        def token_logprobs(self, ids, positions, masks, cache, targets, rows=None):  # type: ignore[no-untyped-def]
            steps.append((*ids.shape, cache.length, cache.batch))
            assert (positions == positions[:, :1]).all()  # every hypothesis of a step is one token deeper
            return engine.token_logprobs(ids, positions, masks, cache, targets, rows=rows)

    users = [HISTORIES[1], HISTORIES[3]]  # 7 and 11 titles: two prompt widths on the int8 route, one batch on native
    beam_search(Recorder(), prompts, TitleTrie.build(CATALOG, prompts), users, k=3, beams=4)  # type: ignore[arg-type]
    assert steps.count(None) == (2 if engine.exact_layout else 1) and len(steps) > 2
    previous = None
    for step in steps:
        if step is not None:
            rows, queries, cached, cache_rows = step
            assert rows <= (1 if engine.exact_layout else 2) and rows <= cache_rows
            assert queries == 4 if engine.exact_layout else 1 <= queries <= 4
            if previous is not None:
                assert cached == previous[2] + previous[1]  # the step's queries became cache columns
        previous = step
