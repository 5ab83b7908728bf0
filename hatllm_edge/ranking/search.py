"""Ranking on any :class:`~hatllm_edge.engine.backend.Backend`: constrained beam search over the
prefix tree of catalog titles (full-catalog top-K) and candidate scoring.

Written once, in NumPy, for both backends; masks come from :mod:`hatllm_edge.core.masks`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.masks import (
    build_masks,
    causal_visibility,
    left_padded,
    padded_positions,
)
from hatllm_edge.core.prompt import Encoded, PromptBuilder
from hatllm_edge.engine.backend import Backend


@dataclass
class TitleTrie:
    """Prefix tree of every catalog title followed by the end marker.

    Node 0 is the root; ``children[n]`` maps (token, is_title) to the next node, so a token
    that ends one title's end marker and continues another title gets two nodes (their
    segments differ); ``items[n]`` lists the catalog indices whose full sequence ends at node n
    (duplicate titles share a leaf); ``is_title[n]`` says whether the token leading to n belongs
    to a title (the answer's segment) or to the end marker (segment 0).
    """

    children: list[dict[tuple[int, bool], int]] = field(default_factory=lambda: [{}])
    items: list[list[int]] = field(default_factory=lambda: [[]])
    is_title: list[bool] = field(default_factory=lambda: [False])
    under: list[list[int]] = field(default_factory=lambda: [[]])  # catalog indices whose sequence passes node n
    paths: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per title: the node before each of its tokens
    _expanded: dict[int, "Children"] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, catalog: Catalog, prompts: PromptBuilder) -> "TitleTrie":
        trie = cls()
        end = prompts.end_ids
        for index, title in enumerate(catalog.titles):
            title_ids = prompts.title_ids(title)
            node, path = 0, [0]
            trie.under[0].append(index)
            for depth, token in enumerate(title_ids + end):
                key = (token, depth < len(title_ids))
                nxt = trie.children[node].get(key)
                if nxt is None:
                    nxt = len(trie.children)
                    trie.children[node][key] = nxt
                    trie.children.append({})
                    trie.items.append([])
                    trie.is_title.append(key[1])
                    trie.under.append([])
                node = nxt
                trie.under[node].append(index)
                path.append(node)
            trie.items[node].append(index)
            trie.paths[title] = tuple(path[:-1])
        return trie

    def expand(self, node: int) -> "Children":
        """The children of ``node`` as arrays (built once per node)."""
        out = self._expanded.get(node)
        if out is None:
            keys = list(self.children[node].items())
            nodes = np.asarray([c for _, c in keys], dtype=np.int64)
            tokens = np.asarray([t for (t, _), _ in keys], dtype=np.int64)
            sizes = [len(self.under[c]) for c in nodes]
            out = Children(tokens, nodes, np.unique(tokens),
                           np.asarray([i for c in nodes for i in self.under[c]], dtype=np.int64),
                           np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if keys else np.zeros(0, np.int64))
            self._expanded[node] = out
        return out


@dataclass(frozen=True)
class Children:
    """A trie node's children: what one beam-search step can append."""

    tokens: np.ndarray  # [C] the token leading to each child
    nodes: np.ndarray  # [C] the child nodes
    allowed: np.ndarray  # the distinct tokens: what a renormalised step normalises over
    items: np.ndarray  # catalog indices under the children, child after child
    starts: np.ndarray  # [C] where each child's items begin in ``items``


@dataclass(frozen=True)
class Fusion:
    """How a step's score is made: the LLM's token log-probability, renormalised over the trie
    node's children (``renormalise``: the probabilities of all catalog titles then sum to 1),
    plus ``weight`` x the log of the assistant's probability mass under the child, divided by
    the mass under its parent (D3's text-free assistant): summed over a title, the second term
    is ``weight`` x log p_assistant(item)."""

    renormalise: bool = False
    weight: float = 0.0
    prior: np.ndarray | None = None  # [U, N] assistant log-probabilities, catalog order (None: no assistant)

    def rows(self, users: Sequence[int]) -> "Fusion":
        return Fusion(self.renormalise, self.weight, None if self.prior is None else self.prior[np.asarray(users)])

    def title_bonus(self, u: int, catalog: Catalog) -> dict[str, float]:
        """Per title: what the assistant adds to a full title's score (its leaf holds every
        item of that title, as in beam search)."""
        if self.prior is None or not self.weight:
            return {}
        mass: dict[str, float] = {}
        for title, p in zip(catalog.titles, np.exp(self.prior[u]).tolist()):
            mass[title] = mass.get(title, 0.0) + p
        return {t: self.weight * float(np.log(max(m, 1e-300))) for t, m in mass.items()}


@dataclass(frozen=True)
class Ranked:
    """A ranked list, best first, and its scores (log-probabilities): ``items`` are catalog
    indices for a full-catalog list, positions in the candidate list for scored candidates."""

    items: list[int]
    scores: list[float]

    def by_position(self) -> np.ndarray:
        """Scored candidates' scores back in the order the candidates were given: what comparing
        two models (or two layouts) candidate by candidate needs."""
        scores = np.empty(len(self.items))
        scores[self.items] = self.scores
        return scores


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logsumexp(x: np.ndarray) -> float:
    top = float(x.max())
    return top + float(np.log(np.exp(x - top).sum()))


PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this many tokens (see prompt_width)


def prompt_width(length: int, bucket: int = PROMPT_BUCKET) -> int:
    """The width a prompt of ``length`` tokens is left-padded to (a multiple of ``bucket``),
    whoever shares its batch.

    ONNX Runtime's attention sums over the whole key length, so the same keys padded to another
    width round differently in the last bit; the int8 route's per-token quantiser turns such a
    bit into a different code now and then, and 30 layers grow that into nats. A width that
    depends on the prompt alone, and batches that only join prompts of one width
    (:func:`by_width`), make a user's result the same bits alone or in any batch."""
    return -(-length // bucket) * bucket


def by_width(encoded: Sequence[Encoded], bucket: int = PROMPT_BUCKET) -> list[list[int]]:
    """Indices of ``encoded`` grouped by :func:`prompt_width`, each group in input order: the
    batches that run together."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(encoded):
        groups.setdefault(prompt_width(len(p), bucket), []).append(i)
    return list(groups.values())


def batches(backend: Backend, encoded: Sequence[Encoded], bucket: int = PROMPT_BUCKET) -> list[list[int]]:
    """The batches a request's prompts run in: one per :func:`prompt_width` where the backend's
    results move with their padding (:attr:`Backend.exact_layout`, the CPU's int8 route), so
    that a user's result is the same bits alone or in company; else all of them together,
    padded to the widest (native arithmetic: within rounding of alone, in a bounded number
    of passes)."""
    return by_width(encoded, bucket) if backend.exact_layout else [list(range(len(encoded)))]


@dataclass(frozen=True)
class Prefilled:
    """Prompts run once, left-padded to one :func:`prompt_width`, so every prompt ends at the
    last column."""

    logprobs: np.ndarray  # [U, V] next-token log-probabilities after each prompt
    cache: Any  # the backend's cache, U rows of width W
    key_segments: np.ndarray  # [U, W] segment ids of the cached tokens (0 under padding)
    key_valid: np.ndarray  # [U, W] False under padding
    lengths: np.ndarray  # [U] prompt lengths (= the next position)


def prefill(backend: Backend, encoded: Sequence[Encoded], bucket: int = PROMPT_BUCKET) -> Prefilled:
    """Run a batch of prompts in one pass (of the widest prompt's :func:`prompt_width`): what
    beam search and candidate scoring start from."""
    width = prompt_width(max(len(p) for p in encoded), bucket)
    ids, segs, valid = left_padded([(p.ids, p.segments) for p in encoded], width)
    masks = build_masks(segs, segs, causal_visibility(valid, width))
    logits, cache = backend.forward(ids, padded_positions(valid), masks, None, last_only=True)
    lengths = np.asarray([len(p) for p in encoded], dtype=np.int64)
    return Prefilled(log_softmax(logits.astype(np.float32)), cache, segs, valid, lengths)


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
) -> list[Ranked]:
    """Top-``k`` catalog items per history by fusion after retrieval: the assistant's ``size``
    (at least ``k``) most likely items (``exclude`` left out) are scored exactly, LLM and
    assistant fused as ``fusion`` says: each gets the score candidate scoring gives its title,
    which is the score beam search would give it. Why: with a heavy assistant weight, fused beam steps follow the
    assistant's mass under each prefix, and a beam filled with prefixes whose mass is spread
    over many unlikely titles prunes likely ones; here nothing inside the shortlist is lost,
    and an item outside it, far down the assistant's list, is never listed."""
    if fusion.prior is None or not fusion.weight:
        raise ValueError("a shortlist is drawn from the assistant: fusion needs its prior and a weight > 0")
    size = max(size, k)
    shortlists = []
    for u in range(len(histories)):
        skip = exclude[u] if exclude is not None else ()
        order = np.argsort(-fusion.prior[u], kind="stable")[: size + len(skip)]
        shortlists.append([int(i) for i in order if int(i) not in skip][:size])
    ranked = score_candidates(backend, prompts, histories, [[catalog.titles[i] for i in s] for s in shortlists],
                              bonus=[fusion.title_bonus(u, catalog) for u in range(len(histories))],
                              renormalise=trie if fusion.renormalise else None)
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
    ``shortlist`` size is given and the assistant is fused, else :func:`beam_search`."""
    if shortlist and fusion.prior is not None and fusion.weight:
        return shortlist_search(backend, prompts, trie, catalog, histories, k, fusion, shortlist, exclude)
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
    hyp_logprobs, hyp_cols = [start.logprobs[u, root] for u in range(users)], [np.zeros(0, dtype=np.int64) for _ in range(users)]
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


PACK_TOKENS = 128  # tokens per packed row (fastest of 64/128/256 for 100 candidates, docs/results.md)


def _fed(answer: Encoded) -> int:
    """Tokens of an answer that go through the model: all but the last (nothing is read after
    it; its own probability comes from the token before)."""
    return len(answer) - 1


def _packs(answers: Sequence[Encoded], limit: int, balanced: bool = True) -> list[list[int]]:
    """Group candidates (by index) into rows of at most ``limit`` fed tokens; a longer
    candidate gets a row of its own.

    ``balanced``: the fewest rows that longest-first packing fits (each candidate, longest
    first, into the least filled row), so the rows come out of near-equal width and the pass,
    as wide as its widest row, pads little (rows filled in order pad 8% of a cand100-h20 pass).
    Otherwise consecutive candidates fill each row in turn."""
    fed = [_fed(a) for a in answers]
    if not balanced:
        packs: list[list[int]] = [[]]
        used = 0
        for i, n in enumerate(fed):
            if packs[-1] and used + n > limit:
                packs.append([])
                used = 0
            packs[-1].append(i)
            used += n
        return packs
    alone = [[i] for i, n in enumerate(fed) if n > limit]
    rest = sorted((i for i, n in enumerate(fed) if n <= limit), key=lambda i: (-fed[i], i))
    if not rest:
        return alone
    count = max(1, -(-sum(fed[i] for i in rest) // limit))
    while True:  # ends by count = len(rest) at the latest: one candidate per row
        rows: list[list[int]] = [[] for _ in range(count)]
        heap = [(0, r) for r in range(count)]  # (fed tokens so far, row)
        for i in rest:
            load, r = heapq.heappop(heap)
            rows[r].append(i)
            heapq.heappush(heap, (load + fed[i], r))
        if max(load for load, _ in heap) <= limit:
            return alone + [sorted(row) for row in rows if row]
        count += 1


def score_candidates(
    backend: Backend,
    prompts: PromptBuilder,
    histories: Sequence[Sequence[str]],
    candidates: Sequence[Sequence[str]],
    normalize: bool = False,
    pack_tokens: int = PACK_TOKENS,
    pass_tokens: int | None = None,
    balanced: bool = True,
    bucket: int = PROMPT_BUCKET,
    bonus: Sequence[Mapping[str, float]] | None = None,
    renormalise: TitleTrie | None = None,
) -> list[Ranked]:
    """Rank each user's candidate titles by log p(title + end marker | prompt), plus the
    user's ``bonus`` of the title where given (the assistant's share, :meth:`Fusion.title_bonus`), best first.
    With ``renormalise`` (the catalog's title tree), each token's probability is taken over
    the children of its trie node only, as a renormalised beam step is, so a candidate scores
    exactly what beam search gives its title (candidates must then be catalog titles).

    The prompts run once, in the backend's :func:`batches`. Candidates are then packed
    end to end into rows of at most ``pack_tokens`` tokens: a candidate's positions restart
    where its prompt ends, and the masks let each of its tokens see its user's prompt (through
    that user's cached keys, gathered by the pass) and its own earlier tokens only, so no
    candidate sees another and no prompt is recomputed. Rows rather than one long row because
    attention in a packed row costs row length x (prompt + row length): short rows waste less
    on blocked-out pairs, at the price of one prompt-cache copy per row. Only the log-probs of
    the tokens read come back (:meth:`Backend.token_logprobs`: the next token, and under
    ``renormalise`` the trie node's allowed tokens), never [T, V] logits. A pass holds at most
    ``pass_tokens`` (default: the backend's :attr:`Backend.pass_tokens`).

    A user's scores depend on its own request alone (to the bit where the backend's
    :attr:`~Backend.exact_layout` asks for it, see :func:`prompt_width`): each distinct title is
    scored once, the titles packed in an order of their tokens (so neither the candidates'
    order nor copies of one move a score); with an exact layout a user's rows are all padded
    to its widest row and a pass joins only rows of one width (``bucket``), otherwise every row
    of the request is padded to the widest. ``normalize`` divides by the answer length. Items
    index each user's ``candidates``.
    """
    if len(histories) != len(candidates):
        raise ValueError(f"{len(histories)} histories but {len(candidates)} candidate lists")
    if renormalise is not None:
        unknown = sorted({t for c in candidates for t in c} - renormalise.paths.keys())
        if unknown:
            raise ValueError(f"renormalised scores need catalog titles; not in the title tree: {unknown[:3]}")
    pass_tokens = pass_tokens or backend.pass_tokens
    encoded = [prompts.prompt(h) for h in histories]
    results: list[Ranked] = [Ranked([], [])] * len(encoded)
    for group in batches(backend, encoded, bucket):
        start = prefill(backend, [encoded[u] for u in group], bucket)
        titles, answers = [], []
        for u in group:  # each distinct title once, in order of its tokens
            seg = prompts.answer_segment(encoded[u])
            encoded_answers = sorted(((tuple(a.ids), t, a) for t in set(candidates[u]) for a in [prompts.answer(t, seg)]),
                                     key=lambda x: x[:2])
            titles.append([t for _, t, _ in encoded_answers])
            answers.append([a for _, _, a in encoded_answers])
        totals = [np.zeros(len(a)) for a in answers]
        trie_paths = None if renormalise is None else (renormalise, [[renormalise.paths[t] for t in ts] for ts in titles])
        by_row_width: dict[int, list[tuple[int, list[int]]]] = {}
        for g, a in enumerate(answers):
            packs = _packs(a, pack_tokens, balanced) if a else []
            widest = max((sum(_fed(a[i]) for i in pack) for pack in packs), default=0)
            by_row_width.setdefault(widest, []).extend((g, pack) for pack in packs)
        if not backend.exact_layout and by_row_width:  # one width for the whole request: fewest passes
            by_row_width = {max(by_row_width): [row for rows in by_row_width.values() for row in rows]}
        for width, rows in sorted(by_row_width.items()):
            per_pass = max(1, pass_tokens // max(1, width))
            for at in range(0, len(rows), per_pass):
                _score_pass(backend, start, answers, rows[at : at + per_pass], width, totals, trie_paths)
        for g, u in enumerate(group):
            score = dict(zip(titles[g], totals[g] / np.asarray([len(x) for x in answers[g]]) if normalize else totals[g]))
            extra = bonus[u] if bonus is not None else {}
            total = np.asarray([score[t] + extra.get(t, 0.0) for t in candidates[u]], dtype=np.float64)
            order = np.argsort(-total, kind="stable")
            results[u] = Ranked([int(i) for i in order], [float(total[i]) for i in order])
    return results


def _score_pass(backend: Backend, start: Prefilled, answers: list[list[Encoded]],
                batch: list[tuple[int, list[int]]], width: int, totals: list[np.ndarray],
                renormalise: tuple[TitleTrie, list[list[tuple[int, ...]]]] | None = None) -> None:
    """One forward pass, ``width`` columns: row r holds user batch[r][0]'s candidates
    batch[r][1], packed (a user may own several rows); users index ``start``.
    ``renormalise``: the title tree and, per user and candidate, the trie node before each
    answer token; each token's log-probability is then taken over that node's children."""
    rows = len(batch)
    ids = np.zeros((rows, width), np.int64)
    targets = np.zeros((rows, width), np.int64)
    q_segs = np.zeros((rows, width), np.int64)
    owner = np.full((rows, width), -1, np.int64)  # which candidate of the row each token is; -1 = padding
    positions = np.zeros((rows, width), np.int64)
    spans: list[list[tuple[int, int, int]]] = []  # per row: (candidate, first column, length)
    for r, (u, pack) in enumerate(batch):
        col, row_spans = 0, []
        for c in pack:
            a = answers[u][c]
            n = _fed(a)
            ids[r, col : col + n], q_segs[r, col : col + n], owner[r, col : col + n] = a.ids[:-1], a.segments[:-1], c
            targets[r, col : col + n] = a.ids[1:]
            positions[r, col : col + n] = start.lengths[u] + np.arange(n)
            row_spans.append((c, col, n))
            col += n
        spans.append(row_spans)
    users = np.asarray([u for u, _ in batch], dtype=np.int64)
    key_segs = np.concatenate([start.key_segments[users], q_segs], axis=1)
    own = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    visible = np.concatenate([np.broadcast_to(start.key_valid[users][:, None, :], (rows, width, start.key_valid.shape[1])),
                              own & np.tril(np.ones((width, width), dtype=bool))], axis=2)
    masks = build_masks(q_segs, key_segs, visible)
    if renormalise is None:
        logprobs, _ = backend.token_logprobs(ids, positions, masks, start.cache, targets, rows=users)
        for r, (u, _) in enumerate(batch):
            for c, col, n in spans[r]:
                totals[u][c] = start.logprobs[u, answers[u][c].ids[0]] + float(logprobs[r, col : col + n].sum())
        return
    # column col + j reads token j and gives token j + 1, below node path[j + 1]: read that
    # token's log-prob and those of the node's allowed tokens (the renormaliser) in the pass
    trie, paths = renormalise
    steps = {(r, col + j): trie.expand(paths[u][c][j + 1]).allowed
             for r, (u, _) in enumerate(batch) for c, col, n in spans[r] for j in range(n)}
    choices = 1 + max((len(a) for a in steps.values()), default=0)
    picked = np.zeros((rows, width, choices), np.int64)
    picked[:, :, 0] = targets
    for (r, col), allowed in steps.items():
        picked[r, col, 1 : 1 + len(allowed)] = allowed
    logprobs, _ = backend.token_logprobs(ids, positions, masks, start.cache, picked, rows=users)  # [rows, width, choices]
    for r, (u, _) in enumerate(batch):
        for c, col, n in spans[r]:
            ids_c, path = answers[u][c].ids, paths[u][c]
            total = _renormalised(start.logprobs[u], trie.expand(path[0]).allowed, ids_c[0])
            for j in range(n):
                allowed = steps[(r, col + j)]
                if len(allowed) > 1:  # a lone child takes all the mass: its step is 0
                    total += float(logprobs[r, col + j, 0]) - logsumexp(logprobs[r, col + j, 1 : 1 + len(allowed)].astype(np.float64))
            totals[u][c] = total


def _renormalised(scores: np.ndarray, allowed: np.ndarray, token: int) -> float:
    """log p(token) over the ``allowed`` tokens only, from logits or log-probabilities [V]."""
    return float(scores[token]) - logsumexp(scores[allowed].astype(np.float64))
