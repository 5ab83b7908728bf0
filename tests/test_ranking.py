"""Ranking on the PyTorch backend with a tiny random Llama (SmolLM2 vocabulary): the title
tree, exact beam search with a wide beam, and candidate scoring against plain forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.masks import LayerSchedule, build_masks, causal_visibility
from hatllm_edge.core.prompt import Encoded, PromptBuilder
from hatllm_edge.ranking.candidates import _fed, _packs, score_candidates
from hatllm_edge.ranking.scoring import Fusion, Ranked, log_softmax
from hatllm_edge.ranking.search import beam_search, full_catalog, shortlist_search
from hatllm_edge.ranking.trie import TitleTrie
from hatllm_edge.training.model import HatLLM
from hatllm_edge.training.torch_backend import TorchBackend

TITLES = [
    "Star Wars",
    "Star Wars (1977)",  # "Star Wars" is a prefix of it
    "Alien",
    "Aliens (1986)",  # "Alien" is a token prefix of it
    "Heat (1995)",
    "Heat (1995)",  # duplicate title, another item
    "Misérables, Les (1995)",
    'He said "hi", then left',
    "Toy Story (1995)",
    "Toy Story 2 (1999)",
    "Fargo (1996)",
    "Babe (1995)",
]
CATALOG = Catalog(tuple(f"i{n}" for n in range(len(TITLES))), tuple(TITLES))
HISTORY = ["Fargo (1996)", "Toy Story (1995)", "Alien"]
# (family, n_in, n_cr). The Gemma3 model's local layer slides over 16 positions, fewer than a
# prompt: beam search and packed candidates, which lay continuations side by side, must cut the
# window where one contiguous forward does.
SCHEDULES = [("llama", 0, 0), ("llama", 1, 1), ("gemma3", 1, 1)]
WINDOW = 16


def make_backend(n_in: int, n_cr: int, family: str = "llama") -> TorchBackend:
    torch.manual_seed(0)
    if family == "gemma3":
        config = Gemma3TextConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                  sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                                  max_position_embeddings=1024, initializer_range=0.2)
        lm = Gemma3ForCausalLM(config).eval()
    else:
        lm = LlamaForCausalLM(tiny_llama_config(layers=2, init=0.2)).eval()
    return TorchBackend(HatLLM(lm, LayerSchedule(2, n_in, n_cr)))


@pytest.fixture(scope="module", params=SCHEDULES, ids=lambda s: f"{s[0]}-in{s[1]}-cr{s[2]}")
def backend(request: pytest.FixtureRequest) -> TorchBackend:
    family, n_in, n_cr = request.param
    return make_backend(n_in, n_cr, family)


@pytest.fixture(scope="module")
def trie(prompts: PromptBuilder) -> TitleTrie:
    return TitleTrie.build(CATALOG, prompts)


def full_forward_score(backend: TorchBackend, prompts: PromptBuilder, history: list[str], title: str) -> float:
    """log p(title + end | prompt) from one plain forward over prompt + answer, no cache."""
    p = prompts.prompt(history)
    a = prompts.answer(title, prompts.answer_segment(p))
    ids = np.concatenate([p.ids, a.ids])[None]
    segs = np.concatenate([p.segments, a.segments])[None]
    m = build_masks(segs, segs, causal_visibility(np.ones_like(ids, dtype=bool), ids.shape[1]))
    with torch.no_grad():
        logits, _ = backend.model(torch.from_numpy(ids), torch.arange(ids.shape[1])[None],
                                  {k: torch.from_numpy(v) for k, v in m.items()})
    logp = torch.log_softmax(logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(len(p), ids.shape[1])))


# --------------------------------------------------------------------- the title tree


def walk(trie: TitleTrie, tokens: tuple[int, ...], title_len: int | None = None) -> list[int]:
    """Nodes along ``tokens``, the first ``title_len`` of them title tokens (default: all)."""
    title_len = len(tokens) if title_len is None else title_len
    nodes = [0]
    for depth, t in enumerate(tokens):
        nodes.append(trie.children[nodes[-1]][(t, depth < title_len)])
    return nodes


def test_trie_structure(trie: TitleTrie, prompts: PromptBuilder) -> None:
    end = prompts.end_ids
    sequences = [prompts.title_ids(t) + end for t in TITLES]
    prefixes = {s[:d] for s in sequences for d in range(1, len(s) + 1)}
    assert len(trie.children) == len(trie.items) == len(trie.is_title) == 1 + len(prefixes)
    leaves = [n for n in range(len(trie.children)) if trie.items[n]]
    assert len(leaves) == len(set(TITLES)) == 11
    for index, (title, seq) in enumerate(zip(TITLES, sequences)):
        n = len(prompts.title_ids(title))
        path = walk(trie, seq, n)
        leaf = path[-1]
        assert index in trie.items[leaf] and trie.children[leaf] == {}
        assert all(trie.is_title[node] for node in path[1 : n + 1]), title
        assert not any(trie.is_title[node] for node in path[n + 1 :]), title
        assert not any(trie.items[node] for node in path[:-1])
    assert trie.items[walk(trie, sequences[4], len(sequences[4]) - len(end))[-1]] == [4, 5]  # duplicates share a leaf
    # after "Star Wars": either the end marker or " (1977)"
    after = walk(trie, prompts.title_ids("Star Wars"))[-1]
    assert set(trie.children[after]) == {(end[0], False), (prompts.title_ids("Star Wars (1977)")[len(prompts.title_ids("Star Wars"))], True)}
    assert trie.is_title[0] is False and trie.items[0] == []


# --------------------------------------------------------------------- scoring


def test_score_candidates_equals_plain_forwards(backend: TorchBackend, prompts: PromptBuilder) -> None:
    cands = TITLES[:7]
    ranked = score_candidates(backend, prompts, [HISTORY], [cands])[0]
    assert sorted(ranked.items) == list(range(7))
    assert ranked.scores == sorted(ranked.scores, reverse=True)
    for i, s in zip(ranked.items, ranked.scores):
        assert s == pytest.approx(full_forward_score(backend, prompts, HISTORY, cands[i]), abs=1e-4), cands[i]
    assert ranked.scores[0] - ranked.scores[-1] > 1.0  # the tiny model separates them


def test_score_candidates_normalize(backend: TorchBackend, prompts: PromptBuilder) -> None:
    cands = ["Star Wars", "Star Wars (1977)", "Misérables, Les (1995)"]
    raw = score_candidates(backend, prompts, [HISTORY], [cands])[0]
    norm = score_candidates(backend, prompts, [HISTORY], [cands], normalize=True)[0]
    raw_by_item = dict(zip(raw.items, raw.scores))
    for i, s in zip(norm.items, norm.scores):
        length = len(prompts.title_ids(cands[i])) + len(prompts.end_ids)
        assert s == pytest.approx(raw_by_item[i] / length, abs=1e-5)
    assert norm.scores == sorted(norm.scores, reverse=True)


def test_score_candidates_single_candidate_and_empty_history(backend: TorchBackend, prompts: PromptBuilder) -> None:
    one = score_candidates(backend, prompts, [[]], [["Babe (1995)"]])[0]
    assert one.items == [0]
    assert one.scores[0] == pytest.approx(full_forward_score(backend, prompts, [], "Babe (1995)"), abs=1e-4)


@pytest.mark.parametrize("balanced", [True, False])
def test_score_candidates_batched_and_split_packs_equal_single_users(backend: TorchBackend, prompts: PromptBuilder,
                                                                     balanced: bool) -> None:
    """Two users of different prompt lengths in one batch, candidates split over several rows
    (12 tokens) and passes (40 tokens): every score equals that user's one-candidate forward."""
    histories = [HISTORY, HISTORY[:1]]
    lists = [TITLES[:5], TITLES[3:7]]
    ranked = score_candidates(backend, prompts, histories, lists, pack_tokens=12, pass_tokens=40, balanced=balanced)
    for history, titles, r in zip(histories, lists, ranked):
        assert sorted(r.items) == list(range(len(titles)))
        for i, s in zip(r.items, r.scores):
            assert s == pytest.approx(full_forward_score(backend, prompts, history, titles[i]), abs=1e-4)


def _answers(lengths: list[int]) -> list[Encoded]:
    """Answers that feed ``lengths`` tokens each (an answer feeds all but its last token)."""
    return [Encoded(np.zeros(n + 1, np.int64), np.zeros(n + 1, np.int64)) for n in lengths]


def test_balanced_packs_fill_the_fewest_rows_evenly() -> None:
    """Every candidate in exactly one row, no row over the limit (but a candidate longer than
    it, alone), as few rows as the tokens need, and fewer padded slots than filling in order."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 25, 100).tolist() + [200]
    answers = _answers(lengths)
    rows = _packs(answers, 128)
    widths = [sum(lengths[i] for i in row) for row in rows]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [row for row, w in zip(rows, widths) if w > 128] == [[100]]
    normal = [w for row, w in zip(rows, widths) if row != [100]]
    assert len(normal) == -(-sum(lengths[:100]) // 128)
    assert max(normal) - min(normal) <= 25  # near-equal widths
    in_order = _packs(answers[:100], 128, balanced=False)
    assert [i for row in in_order for i in row] == list(range(100))  # consecutive runs
    order_width = max(sum(lengths[i] for i in row) for row in in_order)
    assert len(normal) * max(normal) < len(in_order) * order_width
    assert _packs(_answers([3, 3, 3]), 1) == [[0], [1], [2]]  # limit below every length: one row each
    assert _packs(_answers([4, 4, 4]), 4) == [[0], [1], [2]]
    assert _fed(answers[0]) == lengths[0]


def test_score_candidates_rejects_mismatched_lists(backend: TorchBackend, prompts: PromptBuilder) -> None:
    with pytest.raises(ValueError, match="2 histories but 1 candidate"):
        score_candidates(backend, prompts, [HISTORY, HISTORY], [TITLES])


# --------------------------------------------------------------------- beam search


def brute_force(backend: TorchBackend, prompts: PromptBuilder, history: list[str]) -> dict[int, float]:
    ranked = score_candidates(backend, prompts, [history], [TITLES])[0]
    return dict(zip(ranked.items, ranked.scores))


def assert_same_ranking(items: list[int], scores: list[float], brute: dict[int, float], k: int) -> None:
    """Same top-k as brute force: same scores in the same order; items equal up to exact
    ties (the duplicate title)."""
    expected = sorted(brute, key=lambda i: -brute[i])[:k]
    assert len(items) == k and len(set(items)) == k
    np.testing.assert_allclose(scores, [brute[i] for i in expected], atol=1e-4)
    np.testing.assert_allclose(scores, [brute[i] for i in items], atol=1e-4)
    for got, want in zip(items, expected):
        assert got == want or TITLES[got] == TITLES[want]


@pytest.mark.parametrize("k", [12, 5, 1])
def test_wide_beam_is_exact(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie, k: int) -> None:
    brute = brute_force(backend, prompts, HISTORY)
    ranked = beam_search(backend, prompts, trie, [HISTORY], k=k, beams=len(TITLES))[0]
    assert_same_ranking(ranked.items, ranked.scores, brute, k)


def test_search_errors_are_the_missed_targets_that_outscore_the_list(backend: TorchBackend, prompts: PromptBuilder,
                                                                     trie: TitleTrie) -> None:
    """One user per catalog item as the target, all with one history: a narrow beam's missed
    targets are scored exactly; a user is flagged exactly when its target's exact score beats
    the list's k-th and its title is not listed (so every target that belongs in the exact
    top-k and was missed is flagged), and an exact beam has no errors (a duplicate title cut
    at k ties the listed one, whatever the layouts' rounding says)."""
    from hatllm_edge.core.data import Dataset
    from hatllm_edge.ranking.loo import rank_split

    history = [CATALOG.item_ids[TITLES.index(t)] for t in HISTORY]
    data = Dataset("tiny", CATALOG, {f"u{n}": (*history, item) for n, item in enumerate(CATALOG.item_ids)})
    brute = brute_force(backend, prompts, HISTORY)
    exact_top = sorted(brute, key=lambda i: -brute[i])[:3]
    narrow = rank_split(backend, prompts, data, "test", 3, 3, progress=False, search_errors=True)["search_errors"]
    assert narrow["missed_targets"] == sum(r is None for r in
                                           rank_split(backend, prompts, data, "test", 3, 3, progress=False)["ranks"].values())
    listed = {TITLES[i] for i in beam_search(backend, prompts, trie, [HISTORY], k=3, beams=3)[0].items}
    for check in narrow["users"]:
        target = CATALOG.index(data.sequences[check["user"]][-1])
        assert check["target_score"] == pytest.approx(brute[target], abs=1e-3)
        assert check["error"] == (brute[target] > check["kth_score"] and TITLES[target] not in listed)
        if target in exact_top and TITLES[target] not in [TITLES[i] for i in exact_top if i != target]:
            assert check["error"]
    assert narrow["errors"] == sum(c["error"] for c in narrow["users"])
    wide = rank_split(backend, prompts, data, "test", 3, len(TITLES), progress=False, search_errors=True)["search_errors"]
    assert wide["errors"] == 0 and wide["missed_targets"] == len(TITLES) - 3
    assert narrow["errors"] > 0  # this tiny model's narrow beam does prune targets it should keep


OTHER_HISTORIES = [
    ["Misérables, Les (1995)", 'He said "hi", then left', "Heat (1995)", "Heat (1995)"],
    [],
    ["Babe (1995)"],
]


def test_users_batched_together_match_one_at_a_time(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    """Prompts of different lengths run left-padded in one batch; each user's list is the
    one it gets alone (a narrow beam too, where pruning is per user)."""
    histories = [HISTORY, *OTHER_HISTORIES]
    for k, beams in ((12, 12), (4, 2)):
        together = beam_search(backend, prompts, trie, histories, k=k, beams=beams)
        assert len(together) == len(histories)
        for history, got in zip(histories, together):
            alone = beam_search(backend, prompts, trie, [history], k=k, beams=beams)[0]
            assert got.items == alone.items
            np.testing.assert_allclose(got.scores, alone.scores, atol=1e-4)
    for history, got in zip(histories, beam_search(backend, prompts, trie, histories, k=12, beams=12)):
        assert_same_ranking(got.items, got.scores, brute_force(backend, prompts, history), 12)


def test_excluded_items_never_enter_the_list(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    """With the history left out, the search still returns k items, none excluded, and (wide
    enough) exactly brute force's top-k over the items that remain, at the same beam width."""
    brute = brute_force(backend, prompts, HISTORY)
    top = sorted(brute, key=lambda i: -brute[i])
    excluded = set(top[:3]) | {top[7]}
    ranked = beam_search(backend, prompts, trie, [HISTORY, HISTORY], k=6, beams=12, exclude=[excluded, set()])
    assert len(ranked[0].items) == 6 and not excluded & set(ranked[0].items)
    assert_same_ranking(ranked[0].items, ranked[0].scores, {i: s for i, s in brute.items() if i not in excluded}, 6)
    assert_same_ranking(ranked[1].items, ranked[1].scores, brute, 6)  # the other user's list is untouched


def test_duplicate_titles_both_returned(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    ranked = beam_search(backend, prompts, trie, [HISTORY], k=12, beams=12)[0]
    at = ranked.items.index(4)
    assert ranked.items[at + 1] == 5 and ranked.scores[at] == ranked.scores[at + 1]


def test_narrow_beam_scores_are_true_scores(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    """A narrow beam may miss items, but what it returns is sorted and correctly scored."""
    brute = brute_force(backend, prompts, HISTORY)
    ranked = beam_search(backend, prompts, trie, [HISTORY], k=3, beams=2)[0]
    assert 1 <= len(ranked.items) <= 3 and len(set(ranked.items)) == len(ranked.items)
    assert ranked.scores == sorted(ranked.scores, reverse=True)
    np.testing.assert_allclose(ranked.scores, [brute[i] for i in ranked.items], atol=1e-4)


def test_prefill_and_backend_contract(backend: TorchBackend, prompts: PromptBuilder) -> None:
    p = prompts.prompt(HISTORY)
    ids, segs = p.ids[None], p.segments[None]
    m = build_masks(segs, segs, causal_visibility(np.ones_like(ids, dtype=bool), ids.shape[1]))
    logits, cache = backend.forward(ids, np.arange(ids.shape[1])[None], m, None)
    last, _ = backend.forward(ids, np.arange(ids.shape[1])[None], m, None, last_only=True)
    assert logits.dtype == np.float32 and logits.shape == (1, len(p), 49152) and last.shape == (1, 49152)
    np.testing.assert_allclose(last[0], logits[0, -1], atol=1e-5)
    assert len(cache.layers) == 2 and cache.layers[0][0].shape[2] == len(p)
    assert cache.positions.tolist() == [list(range(len(p)))]
    step = {k: np.ones((3, 1, 1, len(p) + 1), bool) for k in m}
    _, grown = backend.forward(ids[:, -1:].repeat(3, 0), np.full((3, 1), len(p)), step, cache, rows=np.array([0, 0, 0]))
    old, new = cache.layers[1][1], grown.layers[1][1]
    assert new.shape[:3] == (3, old.shape[1], len(p) + 1) and torch.equal(new[2, :, :-1], old[0])
    assert grown.positions.tolist() == [list(range(len(p) + 1))] * 3
    np.testing.assert_allclose(np.exp(log_softmax(last)).sum(-1), 1.0, atol=1e-5)


def test_title_followed_by_a_quote(prompts: PromptBuilder) -> None:
    """'Foo' + end marker and the title 'Foo"' share the token '"' after 'Foo'. In 'Foo' it is
    the end marker (segment 0), in 'Foo"' part of the title (answer segment). The trie keeps
    one node for both and marks it a title token, so with IN/CR layers beam search scores
    'Foo' with its end quote in the wrong segment: its score must still be p('Foo' + end)."""
    titles = ["Foo", 'Foo"', "Bar"]
    assert prompts.title_ids('Foo"')[-1] == prompts.end_ids[0]  # the collision is real
    backend = make_backend(1, 1)
    catalog = Catalog(("a", "b", "c"), tuple(titles))
    trie = TitleTrie.build(catalog, prompts)
    ranked = beam_search(backend, prompts, trie, [HISTORY], k=3, beams=3)[0]
    brute = score_candidates(backend, prompts, [HISTORY], [titles])[0]
    expected = dict(zip(brute.items, brute.scores))
    got = dict(zip(ranked.items, ranked.scores))
    assert sorted(got) == [0, 1, 2]
    assert got[1] == pytest.approx(expected[1], abs=1e-4)  # 'Foo"': its quote is a title token
    assert got[0] == pytest.approx(expected[0], abs=1e-4)  # 'Foo': its quote is the end marker


@pytest.mark.parametrize("beams", [3, 5])
def test_fixed_beam_width_gives_lists_that_are_prefixes_of_one_another(
        backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie, beams: int) -> None:
    """With the width held fixed, k only says how many finished items to return (and prunes
    what can no longer enter the top k): the top-k for k = 1..beams are prefixes of one
    another, so asking for more never reorders or drops what a shorter list held (as it did
    when the width followed k)."""
    for history in (HISTORY, *OTHER_HISTORIES):
        lists = [beam_search(backend, prompts, trie, [history], k=k, beams=beams)[0] for k in range(1, beams + 1)]
        longest = lists[-1]
        assert len(longest.items) == beams
        for k, ranked in enumerate(lists, 1):
            assert ranked.items == longest.items[:k], (history, k)
            np.testing.assert_allclose(ranked.scores, longest.scores[:k], atol=1e-6)


# --------------------------------------------------------------------- renormalised steps and the assistant


def leaf_scores(ranked: Ranked) -> dict[int, float]:
    """One score per distinct title (duplicate titles share a leaf and its score)."""
    out: dict[str, float] = {}
    for i, s in zip(ranked.items, ranked.scores):
        out.setdefault(TITLES[i], s)
    return out


def test_renormalised_scores_sum_to_one_over_the_catalog(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    """Log-softmax over the allowed children at every step: the titles' probabilities are a
    distribution over the catalog (each distinct title once); the plain scores are not."""
    for history in (HISTORY, []):
        exact = beam_search(backend, prompts, trie, [history], k=len(TITLES), beams=len(TITLES), fusion=Fusion(renormalise=True))[0]
        assert len(exact.items) == len(TITLES)
        assert sum(np.exp(s) for s in leaf_scores(exact).values()) == pytest.approx(1.0, abs=1e-6)
        plain = beam_search(backend, prompts, trie, [history], k=len(TITLES), beams=len(TITLES))[0]
        assert sum(np.exp(s) for s in leaf_scores(plain).values()) < 0.5


def test_renormalised_scores_are_the_plain_ones_renormalised_per_step(backend: TorchBackend, prompts: PromptBuilder,
                                                                      trie: TitleTrie) -> None:
    """A title whose tokens each have one allowed continuation keeps its plain step score; a
    renormalised score is never below the plain one."""
    plain = leaf_scores(beam_search(backend, prompts, trie, [HISTORY], k=12, beams=12)[0])
    renorm = leaf_scores(beam_search(backend, prompts, trie, [HISTORY], k=12, beams=12, fusion=Fusion(renormalise=True))[0])
    assert set(plain) == set(renorm)
    assert all(renorm[t] >= plain[t] - 1e-9 for t in plain)


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_renormalised_candidate_scores_are_the_renormalised_beam_scores(backend: TorchBackend, prompts: PromptBuilder,
                                                                          trie: TitleTrie, weight: float) -> None:
    """Scored through the candidate path with the title tree, every title gets the score a
    renormalised beam gives it (with and without the assistant), so the candidate scores of
    the whole catalog are a distribution too; small packed rows split titles across passes."""
    histories = [HISTORY, *OTHER_HISTORIES]
    fusion = Fusion(renormalise=True, weight=weight, prior=random_prior(len(histories), seed=1) if weight else None)
    beams = beam_search(backend, prompts, trie, histories, k=len(TITLES), beams=len(TITLES), fusion=fusion)
    bonus = [fusion.title_bonus(u, CATALOG) for u in range(len(histories))] if weight else None
    for pack_tokens in (128, 6):
        scored = score_candidates(backend, prompts, histories, [TITLES] * len(histories), pack_tokens=pack_tokens,
                                  bonus=bonus, renormalise=trie)
        for u in range(len(histories)):
            candidate = dict(zip(scored[u].items, scored[u].scores))
            np.testing.assert_allclose([candidate[i] for i in beams[u].items], beams[u].scores, atol=1e-4)
            if not weight:
                assert sum(np.exp(s) for s in leaf_scores(scored[u]).values()) == pytest.approx(1.0, abs=1e-6)
    plain = score_candidates(backend, prompts, [HISTORY], [TITLES])[0]
    assert dict(zip(plain.items, plain.scores)) != pytest.approx(dict(zip(scored[0].items, scored[0].scores)))


def test_renormalised_candidate_scores_do_not_depend_on_batch_or_order(backend: TorchBackend, prompts: PromptBuilder,
                                                                          trie: TitleTrie) -> None:
    """A user's renormalised scores are the same alone, batched with others, and with its
    candidates reversed."""
    histories = [HISTORY, *OTHER_HISTORIES]
    cands = [TITLES[:7], TITLES[3:], TITLES, TITLES[::2]]
    together = score_candidates(backend, prompts, histories, cands, renormalise=trie)
    for u, (h, c) in enumerate(zip(histories, cands)):
        alone = score_candidates(backend, prompts, [h], [c], renormalise=trie)[0]
        flipped = score_candidates(backend, prompts, [h], [c[::-1]], renormalise=trie)[0]
        by_title = dict(zip((c[i] for i in alone.items), alone.scores))
        assert dict(zip((c[i] for i in together[u].items), together[u].scores)) == pytest.approx(by_title, abs=1e-5)
        assert dict(zip((c[::-1][i] for i in flipped.items), flipped.scores)) == pytest.approx(by_title, abs=1e-5)


def test_renormalised_candidates_must_be_catalog_titles(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    with pytest.raises(ValueError, match="not in the title tree"):
        score_candidates(backend, prompts, [HISTORY], [["Alien", "Not A Catalog Title"]], renormalise=trie)


def random_prior(users: int, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=2.0, size=(users, len(TITLES)))
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def test_shortlist_scores_the_assistants_best_items_exactly(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    """A shortlist of the whole catalog is exact (the widest beam's list and scores); a short one
    lists only the assistant's most likely items that are not excluded, each with its exact
    fused score; without the assistant, full_catalog falls back to beam search."""
    histories = [HISTORY, OTHER_HISTORIES[0]]
    fusion = Fusion(renormalise=True, weight=2.0, prior=random_prior(len(histories), seed=3))
    exact = beam_search(backend, prompts, trie, histories, k=5, beams=len(TITLES), fusion=fusion)
    whole = full_catalog(backend, prompts, trie, CATALOG, histories, 5, 10, fusion, shortlist=len(TITLES))
    for got, want in zip(whole, exact):
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
        assert [TITLES[i] for i in got.items] == [TITLES[i] for i in want.items]
    exclude = [{0, 1}, set()]
    short = shortlist_search(backend, prompts, trie, CATALOG, histories, 3, fusion, 4, exclude)
    bonus = [fusion.title_bonus(u, CATALOG) for u in range(len(histories))]
    for u, ranked in enumerate(short):
        allowed = [int(i) for i in np.argsort(-fusion.prior[u], kind="stable") if int(i) not in exclude[u]][:4]
        assert len(ranked.items) == 3 and set(ranked.items) <= set(allowed)
        scored = score_candidates(backend, prompts, [histories[u]], [[TITLES[i] for i in allowed]], bonus=[bonus[u]],
                                  renormalise=trie)[0]
        assert ranked.items == [allowed[i] for i in scored.items[:3]]
        np.testing.assert_allclose(ranked.scores, scored.scores[:3], atol=1e-6)
    assert len(shortlist_search(backend, prompts, trie, CATALOG, histories, 5, fusion, 2)[0].items) == 5  # never fewer than k
    # one item of the duplicate title ("Heat", items 4 and 5) left out: its assistant mass leaves the
    # title's score in the shortlist as it does in beam search
    dup = [{4}, {5}]
    everything = len(TITLES) - 1
    exact = beam_search(backend, prompts, trie, histories, k=everything, beams=len(TITLES), fusion=fusion, exclude=dup)
    whole = full_catalog(backend, prompts, trie, CATALOG, histories, everything, 10, fusion, shortlist=len(TITLES), exclude=dup)
    for u, (got, want) in enumerate(zip(whole, exact)):
        assert sorted(got.items) == sorted(want.items) == sorted(set(range(len(TITLES))) - dup[u])
        heat = {i: s for i, s in zip(got.items, got.scores)}, {i: s for i, s in zip(want.items, want.scores)}
        kept = 5 if u == 0 else 4
        assert heat[0][kept] == pytest.approx(heat[1][kept], abs=1e-4)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
    alone = full_catalog(backend, prompts, trie, CATALOG, histories, 3, 3, Fusion(renormalise=True), shortlist=4)
    assert [r.items for r in alone] == [r.items for r in beam_search(backend, prompts, trie, histories, 3, 3, Fusion(renormalise=True))]


def test_mixture_ranks_the_shortlist_and_the_llms_own_top_items(backend: TorchBackend, prompts: PromptBuilder,
                                                                 trie: TitleTrie) -> None:
    """A mixture scores each title log(s p_assistant + (1 - s) p_LLM): over the assistant's
    shortlist joined by the LLM's own top k (so the LLM's confident pick is reachable), the
    history left out of both; over the whole catalog it is the exact full-catalog mixture.
    A mixture does not split over beam steps, so a beam search with one is refused."""
    histories = [HISTORY, OTHER_HISTORIES[0]]
    share = 0.7
    fusion = Fusion(renormalise=True, weight=share, prior=random_prior(len(histories), seed=5), mixture=True)
    alone = score_candidates(backend, prompts, histories, [list(TITLES)] * 2, renormalise=trie)
    exclude = [{0}, set()]

    def mixture(u: int, skip: set[int]) -> np.ndarray:  # the mixture's score of every catalog item, by hand
        llm = alone[u].by_position()
        prob = np.exp(fusion.prior[u])
        prob[sorted(skip)] = 0.0
        mass = {t: sum(p for t2, p in zip(TITLES, prob) if t2 == t) for t in TITLES}
        return np.array([np.logaddexp(np.log(share) + np.log(max(mass[t], 1e-300)), np.log(1 - share) + llm[i])
                         for i, t in enumerate(TITLES)])

    whole = full_catalog(backend, prompts, trie, CATALOG, histories, 4, 10, fusion, shortlist=len(TITLES), exclude=exclude)
    for u, ranked in enumerate(whole):
        want = mixture(u, exclude[u])
        order = [int(i) for i in np.argsort(-want, kind="stable") if int(i) not in exclude[u]][:4]
        assert sorted(ranked.items) == sorted(order)
        np.testing.assert_allclose(ranked.scores, sorted(want[order], reverse=True), atol=1e-4)
    short = shortlist_search(backend, prompts, trie, CATALOG, histories, 2, fusion, 2, exclude, beams=10)
    own = beam_search(backend, prompts, trie, histories, k=2, beams=10, fusion=Fusion(renormalise=True), exclude=exclude)
    for u, ranked in enumerate(short):
        pool = [int(i) for i in np.argsort(-fusion.prior[u], kind="stable") if int(i) not in exclude[u]][:2]
        pool += [i for i in own[u].items if i not in pool]
        want = mixture(u, exclude[u])
        assert set(ranked.items) <= set(pool) and len(ranked.items) == 2
        np.testing.assert_allclose(ranked.scores, sorted(want[pool], reverse=True)[:2], atol=1e-4)
    # the LLM's own best title, put last by the assistant, is still listed: it joins the shortlist
    best = [int(np.argmax(alone[u].by_position())) for u in range(2)]
    prior = np.log(np.full((2, len(TITLES)), 0.99 / (len(TITLES) - 1)))
    for u, b in enumerate(best):
        prior[u, b] = np.log(1e-6)
        prior[u, [i for i, t in enumerate(TITLES) if t == TITLES[b] and i != b]] = np.log(1e-6)  # and its namesake
    blind = Fusion(renormalise=True, weight=0.5, prior=prior, mixture=True)
    for u, ranked in enumerate(shortlist_search(backend, prompts, trie, CATALOG, histories, 2, blind, 2, beams=10)):
        assert best[u] in ranked.items or TITLES[best[u]] in {TITLES[i] for i in ranked.items}
        assert best[u] not in np.argsort(-prior[u], kind="stable")[:2]
    with pytest.raises(ValueError, match="whole titles"):
        beam_search(backend, prompts, trie, histories, k=2, fusion=fusion)
    with pytest.raises(InputError, match="needs a shortlist"):
        full_catalog(backend, prompts, trie, CATALOG, histories, 2, 10, fusion, shortlist=0)


@pytest.mark.parametrize(("weight", "mixture"), [(4.0, False), (0.7, True)])
def test_shortlist_lists_do_not_depend_on_batch_or_order(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie,
                                                         weight: float, mixture: bool) -> None:
    """Users of different prompt lengths and exclusions batched together, in either order, get
    the list each gets alone with its own row of the assistant's prior (the product, and the
    mixture with the LLM's own top items joining the shortlist)."""
    histories = [HISTORY, *OTHER_HISTORIES]
    fusion = Fusion(renormalise=True, weight=weight, prior=random_prior(len(histories), seed=5), mixture=mixture)
    exclude = [{2}, set(), {0, 1, 5}, set()]
    alone = [shortlist_search(backend, prompts, trie, CATALOG, [h], 4, fusion.rows([u]), 6, [exclude[u]])[0]
             for u, h in enumerate(histories)]
    together = shortlist_search(backend, prompts, trie, CATALOG, histories, 4, fusion, 6, exclude)
    back = list(range(len(histories)))[::-1]
    reversed_ = shortlist_search(backend, prompts, trie, CATALOG, [histories[u] for u in back], 4, fusion.rows(back), 6,
                                 [exclude[u] for u in back])[::-1]
    for u, want in enumerate(alone):
        assert not exclude[u] & set(want.items)
        for got in (together[u], reversed_[u]):
            assert got.items == want.items
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_fused_beam_score_is_llm_plus_weight_times_assistant(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie,
                                                             weight: float) -> None:
    """Summed over a title, the assistant's per-step mass ratios telescope to weight x log of
    its probability of the title's leaf (both items of a duplicate title): the fused beam
    score equals the fused candidate score of the same title."""
    histories = [HISTORY, OTHER_HISTORIES[0]]
    prior = random_prior(len(histories))
    fusion = Fusion(weight=weight, prior=prior)
    fused = beam_search(backend, prompts, trie, histories, k=len(TITLES), beams=len(TITLES), fusion=fusion)
    bonus = [fusion.title_bonus(u, CATALOG) for u in range(len(histories))]
    scored = score_candidates(backend, prompts, histories, [TITLES] * len(histories), bonus=bonus)
    for u, history in enumerate(histories):
        llm = brute_force(backend, prompts, history)
        want = {}
        for i, t in enumerate(TITLES):
            mass = sum(np.exp(prior[u, j]) for j, s in enumerate(TITLES) if s == t)
            want[i] = llm[i] + weight * np.log(mass)
        assert_same_ranking(fused[u].items, fused[u].scores, want, len(TITLES))
        candidate = dict(zip(scored[u].items, scored[u].scores))
        np.testing.assert_allclose([candidate[i] for i in fused[u].items], fused[u].scores, atol=1e-4)


def test_heavy_assistant_weight_follows_the_assistant(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    prior = random_prior(1, seed=3)
    ranked = beam_search(backend, prompts, trie, [HISTORY], k=3, beams=3, fusion=Fusion(weight=1000.0, prior=prior))[0]
    assert ranked.items[0] == int(np.argmax(prior[0]))


def test_zero_weight_is_the_llm_alone(backend: TorchBackend, prompts: PromptBuilder, trie: TitleTrie) -> None:
    plain = beam_search(backend, prompts, trie, [HISTORY], k=5, beams=5)[0]
    zero = beam_search(backend, prompts, trie, [HISTORY], k=5, beams=5, fusion=Fusion(weight=0.0, prior=random_prior(1)))[0]
    assert plain == zero


def test_logsumexp_of_nothing_possible_is_minus_infinity() -> None:
    """Every allowed token at -inf (an overflowing fp16 graph): the step's mass is -inf, not NaN,
    so the sort that follows stays defined."""
    from hatllm_edge.ranking.scoring import logsumexp

    assert logsumexp(np.full(3, -np.inf)) == -np.inf
    assert logsumexp(np.log(np.array([0.25, 0.75]))) == pytest.approx(0.0, abs=1e-12)
