"""Many requests, one engine call per group: each result equals the request ranked alone, in
request order; requests are checked from bytes with the same messages as a user.json file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_bundle

from hatllm_edge.app.rank import RankOptions, prepare, rank_prepared
from hatllm_edge.app.request import RankRequest, parse_request
from hatllm_edge.core.errors import InputError
from hatllm_edge.ranking.ranker import Ranker

TITLES = ["Alpha (1990)", "Beta (1991)", "Gamma, The (1992)", "Delta (1993)", "Epsilon (1994)", "Zeta (1995)",
          "Eta (1996)", "Theta (1997)", "Iota (1998)", "Kappa (1999)"]
IDS = [f"i{n}" for n in range(1, len(TITLES) + 1)]


@pytest.fixture(scope="module")
def ranker(tokenizer_json: Path, tmp_path_factory: pytest.TempPathFactory) -> Ranker:
    """On the engine's int8 route, where a last-bit difference in company would show."""
    return Ranker.from_bundle(tiny_bundle(tmp_path_factory.mktemp("batch"), tokenizer_json, TITLES, IDS, 5), threads=1)


def test_a_bundle_named_by_a_string_ranks_as_by_a_path(ranker: Ranker, tokenizer_json: Path, tmp_path: Path) -> None:
    """Library callers pass paths as text: a str folder loads and ranks exactly as a Path."""
    folder = tiny_bundle(tmp_path, tokenizer_json, TITLES, IDS, 5)
    by_text = Ranker.from_bundle(str(folder), threads=1).top_k([[0, 1]], k=3)[0]
    by_path = ranker.top_k([[0, 1]], k=3)[0]
    assert (by_text.items, by_text.scores) == (by_path.items, by_path.scores)


REQUESTS: list[dict[str, Any]] = [
    {"history": ["i1", "i2"], "user_id": "a"},
    {"history": ["Gamma, The (1992)"], "k": 3},
    {"history": ["i4", "i5", "i6", "i7", "i8", "i9"], "user_id": 7},  # longer than the model reads
    {"history": ["i2"], "candidates": ["i3", "i1", "i10"]},
    {"history": ["i9", "i3", "i1"], "k": 3, "beams": 4},
    {"history": ["i10", "i2", "i3"], "candidates": ["i4", "i5"]},
    {"history": ["i6"], "k": 3},
    {"history": ["i5", "i6"], "user_id": "h"},
]


def rows(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "latency_ms"}


@pytest.mark.parametrize("exclude_history", [False, True])
def test_requests_ranked_together_equal_each_alone(ranker: Ranker, exclude_history: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    opts = RankOptions(exclude_history=exclude_history)
    prepared = [prepare(ranker, parse_request(json.dumps(r).encode(), f"request {n}"), f"request {n}", opts)
                for n, r in enumerate(REQUESTS)]
    alone = [rank_prepared(ranker, [p])[0] for p in prepared]
    calls = []
    for name in ("top_k", "score_batch"):
        method = getattr(ranker, name)
        monkeypatch.setattr(ranker, name, lambda *a, _m=method, _n=name, **kw: calls.append(_n) or _m(*a, **kw))
    together = rank_prepared(ranker, prepared)
    assert [rows(r) for r in together] == [rows(r) for r in alone]
    assert [r["user_id"] for r in together] == [r.get("user_id") for r in REQUESTS]
    for r, req in zip(together, REQUESTS):
        pool = set(req.get("candidates", IDS)) - (set(ranker.catalog.item_ids[i] for i in ranker.resolve(req["history"], "h"))
                                                  if exclude_history else set())
        assert len(r["results"]) == min(req.get("k", 10), len(pool))
    # one call for the candidate requests, one per (list length, beam width) of the full-catalog ones
    assert calls.count("score_batch") == 1 and len(calls) == 4 < len(REQUESTS)
    if exclude_history:
        for r, req in zip(together, REQUESTS):
            history = set(ranker.resolve(req["history"], "h"))
            assert not history & {ranker.catalog.index(row["item_id"]) for row in r["results"]}


@pytest.mark.parametrize(("body", "needle"), [
    (b'{"history": []}', "request 3: field 'history' must be a non-empty list"),
    (b'{"history": ["i1"], "k": 0}', "request 3: field 'k' is 0; it must be from 1 to"),
    (b'{"history": ["i1"], "colour": "red"}', "request 3: unknown field 'colour'"),
    (b'{"history": ["i1"], "history": ["i2"]}', "request 3: field 'history' appears twice"),
    (b'[1, 2]', 'request 3: expected a JSON object like {"history": [...]}'),
    (b'{"history": ["i1"]', "request 3:1: not valid JSON"),
    (b'\xff\xfe', "request 3: not UTF-8 text"),
])
def test_a_request_from_bytes_is_checked_like_a_file(body: bytes, needle: str) -> None:
    with pytest.raises(InputError) as e:
        parse_request(body, "request 3")
    assert needle in str(e.value)


def test_resolution_errors_name_the_request(ranker: Ranker) -> None:
    with pytest.raises(InputError, match=r"request 5: history\[1\]: 'Omega \(2000\)' is neither an item id nor an exact title"):
        prepare(ranker, RankRequest(**{"history": ["i1", "Omega (2000)"]}), "request 5", RankOptions())
    with pytest.raises(InputError, match="request 5: candidates\\[1\\]: 'i3' is the same item as candidates\\[0\\]"):
        prepare(ranker, RankRequest(**{"history": ["i1"], "candidates": ["i3", "i3"]}), "request 5", RankOptions())
    with pytest.raises(InputError, match="k is 20 but the catalog has 10 items"):
        prepare(ranker, RankRequest(**{"history": ["i1"], "k": 20}), "request 5", RankOptions())
