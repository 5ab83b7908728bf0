"""Ranking on any :class:`~hatllm_edge.backend.Backend`: constrained beam search over the
prefix tree of catalog titles (full-catalog top-K) and candidate scoring.

Written once, in NumPy, for both backends; masks come from :mod:`hatllm_edge.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from hatllm_edge.backend import Backend
from hatllm_edge.data import Catalog
from hatllm_edge.masks import build_masks, causal_visibility
from hatllm_edge.prompt import Encoded, PromptBuilder


@dataclass
class TitleTrie:
    """Prefix tree of every catalog title followed by the end marker.

    Node 0 is the root; ``children[n]`` maps a token to the next node; ``items[n]`` lists the
    catalog indices whose full sequence ends at node n (duplicate titles share a leaf);
    ``is_title[n]`` says whether the token leading to n belongs to a title (segment of the
    answer) or to the end marker (segment 0).
    """

    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    items: list[list[int]] = field(default_factory=lambda: [[]])
    is_title: list[bool] = field(default_factory=lambda: [False])

    @classmethod
    def build(cls, catalog: Catalog, prompts: PromptBuilder) -> "TitleTrie":
        trie = cls()
        end = prompts.end_ids
        for index, title in enumerate(catalog.titles):
            title_ids = prompts.title_ids(title)
            node = 0
            for depth, token in enumerate(title_ids + end):
                nxt = trie.children[node].get(token)
                if nxt is None:
                    nxt = len(trie.children)
                    trie.children[node][token] = nxt
                    trie.children.append({})
                    trie.items.append([])
                    trie.is_title.append(False)
                trie.is_title[nxt] |= depth < len(title_ids)
                node = nxt
            trie.items[node].append(index)
        return trie


@dataclass(frozen=True)
class Ranked:
    """A ranked list: catalog indices, best first, and their scores (log-probabilities)."""

    items: list[int]
    scores: list[float]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def prefill(backend: Backend, prompt: Encoded) -> tuple[np.ndarray, Any]:
    """Run the prompt once: log-probabilities of the next token [V] and the cache."""
    ids, segs = prompt.ids[None, :], prompt.segments[None, :]
    visible = causal_visibility(np.ones_like(ids, dtype=bool), ids.shape[1])
    logits, cache = backend.forward(ids, np.arange(ids.shape[1])[None, :], build_masks(segs, segs, visible), None, last_only=True)
    return log_softmax(logits[0].astype(np.float32)), cache


def beam_search(
    backend: Backend,
    prompts: PromptBuilder,
    trie: TitleTrie,
    history: Sequence[str],
    k: int = 10,
    beams: int | None = None,
) -> Ranked:
    """Top-``k`` catalog items by constrained beam search (``beams`` wide, default ``k``).

    Every step keeps the ``beams`` best unfinished hypotheses; finished ones (a full title and
    its end marker) are collected, and the search stops as soon as no unfinished hypothesis
    can still beat the k-th finished one (scores only fall as tokens are added).
    """
    beams = beams or k
    prompt = prompts.prompt(history)
    answer_seg = prompts.answer_segment(prompt)
    logprobs, cache = prefill(backend, prompt)
    length = len(prompt)
    nodes = [0]
    scores = np.zeros(1)
    key_segs = prompt.segments[None, :]
    finished: list[tuple[float, int]] = []  # (score, leaf node)
    logprobs = logprobs[None, :]
    while nodes:
        parents, tokens, children, cand = [], [], [], []
        for b, node in enumerate(nodes):
            for token, child in trie.children[node].items():
                parents.append(b)
                tokens.append(token)
                children.append(child)
                cand.append(scores[b] + logprobs[b, token])
        order = np.argsort(-np.asarray(cand), kind="stable")
        next_nodes, next_parents, next_tokens, next_scores = [], [], [], []
        for i in order:
            child = children[i]
            if trie.items[child]:
                finished.append((float(cand[i]), child))
            elif len(next_nodes) < beams:
                next_nodes.append(child)
                next_parents.append(parents[i])
                next_tokens.append(tokens[i])
                next_scores.append(cand[i])
        finished.sort(key=lambda f: -f[0])
        bound = finished[k - 1][0] if len(finished) >= k else -np.inf
        keep = [j for j, s in enumerate(next_scores) if s > bound]
        if not keep:
            break
        nodes = [next_nodes[j] for j in keep]
        scores = np.asarray([next_scores[j] for j in keep])
        parent_idx = np.asarray([next_parents[j] for j in keep], dtype=np.int64)
        ids = np.asarray([[next_tokens[j]] for j in keep], dtype=np.int64)
        q_segs = np.asarray([[answer_seg if trie.is_title[n] else 0] for n in nodes], dtype=np.int64)
        key_segs = np.concatenate([key_segs[parent_idx], q_segs], axis=1)
        cache = backend.select(cache, parent_idx)
        visible = causal_visibility(np.ones(key_segs.shape, dtype=bool), 1)
        logits, cache = backend.forward(
            ids, np.full((len(nodes), 1), length, dtype=np.int64), build_masks(q_segs, key_segs, visible), cache, last_only=True
        )
        logprobs = log_softmax(logits.astype(np.float32))
        length += 1
    items, item_scores = [], []
    for score, leaf in finished:
        for item in trie.items[leaf]:
            items.append(item)
            item_scores.append(score)
    return Ranked(items[:k], item_scores[:k])


def score_candidates(
    backend: Backend,
    prompts: PromptBuilder,
    history: Sequence[str],
    candidates: Sequence[str],
    normalize: bool = False,
) -> Ranked:
    """Rank candidate titles by log p(title + end marker | prompt), best first.

    The prompt runs once; all candidates then run as one batch on copies of its cache, each
    attending to the prompt and its own tokens only (right padding is masked out).
    ``normalize`` divides by the answer length. Items are indices into ``candidates``.
    """
    prompt = prompts.prompt(history)
    seg = prompts.answer_segment(prompt)
    first_logprobs, cache = prefill(backend, prompt)
    answers = [prompts.answer(title, seg) for title in candidates]
    n, width, plen = len(answers), max(len(a) for a in answers), len(prompt)
    ids = np.zeros((n, width), dtype=np.int64)
    q_segs = np.zeros((n, width), dtype=np.int64)
    valid = np.zeros((n, width), dtype=bool)
    for i, a in enumerate(answers):
        ids[i, : len(a)], q_segs[i, : len(a)], valid[i, : len(a)] = a.ids, a.segments, True
    key_segs = np.concatenate([np.broadcast_to(prompt.segments, (n, plen)), q_segs], axis=1)
    key_valid = np.concatenate([np.ones((n, plen), dtype=bool), valid], axis=1)
    visible = causal_visibility(key_valid, width)
    positions = np.broadcast_to(np.arange(plen, plen + width), (n, width))
    logits, _ = backend.forward(ids, positions, build_masks(q_segs, key_segs, visible), backend.select(cache, np.zeros(n, dtype=np.int64)))
    logprobs = log_softmax(logits.astype(np.float32))  # [n, width, V]
    token_lp = np.concatenate(
        [first_logprobs[ids[:, :1]], np.take_along_axis(logprobs[:, :-1], ids[:, 1:, None], axis=2)[..., 0]], axis=1
    )
    totals = (token_lp * valid).sum(axis=1)
    if normalize:
        totals = totals / valid.sum(axis=1)
    order = np.argsort(-totals, kind="stable")
    return Ranked([int(i) for i in order], [float(totals[i]) for i in order])
