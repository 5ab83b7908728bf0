"""Constrained beam search over the title tree on any :class:`~hatllm_edge.engine.backend.Backend`:
a user's full-catalog top-K, fused with the assistant per step or over its shortlist.

Written once, in NumPy, for both backends; masks come from :mod:`hatllm_edge.core.masks`.
"""

from __future__ import annotations

from typing import Collection, Sequence

import numpy as np

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.masks import build_masks
from hatllm_edge.core.prompt import Encoded, PromptBuilder
from hatllm_edge.engine.backend import Backend
from hatllm_edge.ranking.candidates import score_candidates
from hatllm_edge.ranking.prefill import batches, prefill
from hatllm_edge.ranking.scoring import Fusion, Ranked, logsumexp
from hatllm_edge.ranking.trie import TitleTrie


def beam_search(
    backend: Backend,
    prompts: PromptBuilder,
    trie: TitleTrie,
    histories: Sequence[Sequence[str]],
    k: int = 10,
    beams: int | None = None,
    fusion: Fusion = Fusion(),
    exclude: Sequence[Collection[int]] | None = None,
) -> list[Ranked]:
    """Top-``k`` catalog items for each history by constrained beam search (``beams`` wide,
    default ``k``), each step scored as ``fusion`` says (default: the LLM's log-probability).
    All users' beams run as one batch, so each step reads the weights once. ``exclude``: per
    user, catalog indices that never enter the list (the user's history, where a product does
    not recommend what was seen); a branch of the title tree that leads only to excluded items
    is never expanded, so the search finds k others at the same beam width, and the
    assistant's mass under a branch counts only the items it can still yield.

    Users run in the :func:`batches` the backend allows, so a user's list is what it is alone.
    Every step is one backend pass with one row per user still searching (see :func:`_search`:
    the hypotheses are that row's queries). Per user, every step keeps the ``beams`` best unfinished hypotheses; finished ones (a full
    title and its end marker) are collected, and the user is done as soon as none of its
    unfinished hypotheses can still beat its k-th finished one (scores only fall).
    """
    if fusion.mixed:
        raise ValueError("a mixture scores whole titles, not beam steps: rank a shortlist (shortlist_search)")
    beams = beams or k
    encoded = [prompts.prompt(h) for h in histories]
    results: list[Ranked] = [Ranked([], [])] * len(encoded)
    for group in batches(backend, encoded):
        skip = [frozenset(exclude[u]) if exclude is not None else frozenset() for u in group]
        for u, ranked in zip(group, _search(backend, prompts, trie, [encoded[u] for u in group], k, beams,
                                            fusion.rows(group), skip)):
            results[u] = ranked
    return results


def shortlist_search(
    backend: Backend,
    prompts: PromptBuilder,
    trie: TitleTrie,
    catalog: Catalog,
    histories: Sequence[Sequence[str]],
    k: int,
    fusion: Fusion,
    size: int,
    exclude: Sequence[Collection[int]] | None = None,
    beams: int | None = None,
) -> list[Ranked]:
    """Top-``k`` catalog items per history by fusion after retrieval: the assistant's ``size``
    (at least ``k``) most likely items (``exclude`` left out) are scored exactly, LLM and
    assistant fused as ``fusion`` says: each gets the score candidate scoring gives its title,
    which is the score beam search would give it. Why: with a heavy assistant weight, fused beam steps follow the
    assistant's mass under each prefix, and a beam filled with prefixes whose mass is spread
    over many unlikely titles prunes likely ones; here nothing inside the shortlist is lost,
    and an item outside it, far down the assistant's list, is never listed. A mixture
    (:attr:`Fusion.mixed`) also lists what the LLM alone is sure of, so the LLM's own top ``k``
    (its beam search, ``beams`` wide) joins the shortlist first."""
    if fusion.prior is None or not fusion.weight:
        raise ValueError("a shortlist is drawn from the assistant: fusion needs its prior and a weight > 0")
    size = max(size, k)
    skips = [exclude[u] if exclude is not None else () for u in range(len(histories))]
    shortlists = []
    for u, skip in enumerate(skips):
        order = np.argsort(-fusion.prior[u], kind="stable")[: size + len(skip)]
        shortlists.append([int(i) for i in order if int(i) not in skip][:size])
    if fusion.mixed:
        own = beam_search(backend, prompts, trie, histories, k, beams, Fusion(fusion.renormalise), exclude)
        shortlists = [s + [i for i in o.items if i not in s] for s, o in zip(shortlists, own)]
    titles = [[catalog.titles[i] for i in s] for s in shortlists]
    ranked = score_candidates(backend, prompts, histories, titles,
                              bonus=[fusion.title_bonus(u, catalog, skip) for u, skip in enumerate(skips)],
                              renormalise=trie if fusion.renormalise else None)
    if fusion.mixed:
        ranked = [fusion.mix(u, catalog, titles[u], r, skips[u]) for u, r in enumerate(ranked)]
    return [Ranked([s[i] for i in r.items[:k]], r.scores[:k]) for s, r in zip(shortlists, ranked)]


def full_catalog(
    backend: Backend,
    prompts: PromptBuilder,
    trie: TitleTrie,
    catalog: Catalog,
    histories: Sequence[Sequence[str]],
    k: int,
    beams: int,
    fusion: Fusion,
    shortlist: int = 0,
    exclude: Sequence[Collection[int]] | None = None,
) -> list[Ranked]:
    """Full-catalog top-``k``, as the decoding says: :func:`shortlist_search` when a
    ``shortlist`` size is given and the assistant is fused, else :func:`beam_search` (a
    mixture, which needs whole titles, is refused there)."""
    if shortlist and fusion.prior is not None and fusion.weight:
        return shortlist_search(backend, prompts, trie, catalog, histories, k, fusion, shortlist, exclude, beams)
    if fusion.mixed:
        raise InputError("a mixture of the LLM and the assistant scores whole titles: it needs a shortlist (--shortlist N, N > 0)")
    return beam_search(backend, prompts, trie, histories, k=k, beams=beams, fusion=fusion, exclude=exclude)


def _search(backend: Backend, prompts: PromptBuilder, trie: TitleTrie, encoded: Sequence[Encoded], k: int,
            beams: int, fusion: Fusion, exclude: Sequence[frozenset[int]]) -> list[Ranked]:
    """:func:`beam_search` for one batch of prompts, in a tree layout: a user's hypotheses are
    the ``width`` query positions of one row that holds its prompt once, and every token a step
    feeds is appended to that row's cache; the masks let each hypothesis see the prompt and its
    own ancestors only. One row per user rather than one per hypothesis because a pass copies
    its rows' caches (gathered, then extended): per hypothesis that is ``beams`` copies of the
    prompt's keys at every step, which cost more than the step's arithmetic (2-3x the step time
    at a 20-title prompt). ``width`` is ``beams`` on a backend with an exact layout (a row's key
    columns then depend on its own steps alone, whatever its company), else the most
    hypotheses any user keeps in the step."""
    users = len(encoded)
    answer_seg = np.asarray([prompts.answer_segment(p) for p in encoded])
    start = prefill(backend, encoded)
    cache, key_segs = start.cache, start.key_segments
    cache_row = np.arange(users)  # each user's row in the cache (-1: done)
    # live hypotheses, flat over users: user, trie node, score, assistant log mass, the
    # log-probs of the node's allowed tokens, and the cache columns of the tokens it fed (its ancestors)
    hyp_user, hyp_node, hyp_score, hyp_mass = np.arange(users), np.zeros(users, dtype=np.int64), np.zeros(users), np.zeros(users)
    root = trie.expand(0).allowed
    hyp_logprobs = [start.logprobs[u, root].astype(np.float64) for u in range(users)]  # float64 as every later step
    hyp_cols = [np.zeros(0, dtype=np.int64) for _ in range(users)]
    assist = fusion.prior is not None and fusion.weight != 0
    prob = np.exp(fusion.prior) if assist else None
    if prob is not None:  # the assistant's mass under a branch counts only what may still be recommended;
        for u in range(users):  # not renormalised, so a title's score stays what candidate scoring gives it
            if exclude[u]:
                prob[u, sorted(exclude[u])] = 0.0
    finished: list[list[tuple[float, int]]] = [[] for _ in range(users)]  # (score, leaf node)
    step = 0
    while len(hyp_user):
        kept_by_user: list[list[tuple[float, int, int, int, float]]] = []  # (score, parent, token, child, mass)
        for u in range(users):
            cand = []
            for h in np.flatnonzero(hyp_user == u):
                ch = trie.expand(hyp_node[h])
                gain = hyp_logprobs[h][np.searchsorted(ch.allowed, ch.tokens)]
                if fusion.renormalise:
                    gain = gain - logsumexp(hyp_logprobs[h])
                mass = np.zeros(len(ch.nodes))
                if assist:
                    mass = np.log(np.maximum(np.add.reduceat(prob[u, ch.items], ch.starts), 1e-300))
                    gain = gain + fusion.weight * (mass - hyp_mass[h])
                found = zip((hyp_score[h] + gain).tolist(), [h] * len(gain), ch.tokens.tolist(), ch.nodes.tolist(), mass.tolist())
                if exclude[u]:  # a branch that leads only to excluded items never takes a beam
                    found = (c for c in found if not exclude[u].issuperset(trie.under[c[3]]))
                cand += found
            cand.sort(key=lambda x: -x[0])
            kept = []
            for score, h, t, child, m in cand:
                if trie.items[child]:
                    if not exclude[u].issuperset(trie.items[child]):
                        finished[u].append((float(score), child))
                elif len(kept) < beams:
                    kept.append((score, h, t, child, m))
            finished[u].sort(key=lambda f: -f[0])
            bound = finished[u][k - 1][0] if len(finished[u]) >= k else -np.inf
            kept_by_user.append([c for c in kept if c[0] > bound])
        active = [u for u in range(users) if kept_by_user[u]]
        if not active:
            break
        width = beams if backend.exact_layout else max(len(kept_by_user[u]) for u in active)
        rows, length = len(active), key_segs.shape[1]
        ids = np.zeros((rows, width), dtype=np.int64)
        allowed = max(len(trie.expand(c[3]).allowed) for u in active for c in kept_by_user[u])
        targets = np.zeros((rows, width, allowed), dtype=np.int64)  # each hypothesis reads its next node's allowed tokens
        q_segs = np.zeros((rows, width), dtype=np.int64)
        visible = np.zeros((rows, width, length + width), dtype=bool)
        visible[:, :, : start.key_valid.shape[1]] = start.key_valid[active][:, None, :]
        fed = []  # (user, node, score, mass, cache columns, row, query, allowed next tokens) of each hypothesis fed now
        for i, u in enumerate(active):
            for j, (score, h, t, child, m) in enumerate(kept_by_user[u]):
                ids[i, j] = t
                next_tokens = trie.expand(child).allowed
                targets[i, j, : len(next_tokens)] = next_tokens
                q_segs[i, j] = answer_seg[u] if trie.is_title[child] else 0
                visible[i, j, hyp_cols[h]] = True
                fed.append((u, child, score, m, np.append(hyp_cols[h], length + j), i, j, len(next_tokens)))
        key_segs = np.concatenate([key_segs[cache_row[active]], q_segs], axis=1)
        masks = build_masks(q_segs, key_segs, visible)
        positions = np.repeat((start.lengths[active] + step)[:, None], width, axis=1)
        logprobs, cache = backend.token_logprobs(ids, positions, masks, cache, targets, rows=cache_row[active])
        fed_user, fed_node, fed_score, fed_mass, fed_cols, at_row, at_query, n_next = zip(*fed)
        hyp_cols = list(fed_cols)
        hyp_logprobs = [logprobs[i, j, :n].astype(np.float64) for i, j, n in zip(at_row, at_query, n_next)]
        hyp_user, hyp_node = np.asarray(fed_user, dtype=np.int64), np.asarray(fed_node, dtype=np.int64)
        hyp_score, hyp_mass = np.asarray(fed_score), np.asarray(fed_mass)
        cache_row = np.full(users, -1)
        cache_row[active] = np.arange(rows)
        step += 1
    results = []
    for u in range(users):
        items, scores = [], []
        for score, leaf in finished[u]:
            kept_items = [i for i in trie.items[leaf] if i not in exclude[u]]
            items += kept_items
            scores += [score] * len(kept_items)
        results.append(Ranked(items[:k], scores[:k]))
    return results
