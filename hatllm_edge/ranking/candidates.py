"""Candidate scoring: each candidate title's log-probability after the prompt, candidates
packed into rows that see the prompt and their own tokens only."""

from __future__ import annotations

import heapq
from typing import Mapping, Sequence

import numpy as np

from hatllm_edge.core.masks import build_masks, packed_visibility
from hatllm_edge.core.prompt import Encoded, PromptBuilder
from hatllm_edge.engine.backend import Backend
from hatllm_edge.ranking.prefill import PROMPT_BUCKET, Prefilled, batches, prefill
from hatllm_edge.ranking.scoring import Ranked, logsumexp
from hatllm_edge.ranking.trie import TitleTrie

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
    to its widest row and a pass joins only rows of one such width, otherwise every row
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
    masks = build_masks(q_segs, key_segs, packed_visibility(start.key_valid[users], owner))
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
