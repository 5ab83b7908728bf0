"""``loo-full`` ranking of a data split: every user's full-catalog top-k (constrained beam
search, or the assistant's shortlist scored exactly) on any backend, with the target's rank. Validation during training and ``evaluate``
both run it."""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Collection, Sequence

from tqdm import tqdm

from hatllm_edge.core.data import Dataset, Example, Split
from hatllm_edge.core.machine import peak_rss_mib
from hatllm_edge.core.metrics import mean_metrics, target_rank
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.engine.backend import Backend
from hatllm_edge.ranking.candidates import score_candidates
from hatllm_edge.ranking.prefill import prompt_width
from hatllm_edge.ranking.scoring import Fusion, Ranked
from hatllm_edge.ranking.search import full_catalog
from hatllm_edge.ranking.trie import TitleTrie


def split_examples(data: Dataset, split: Split, users: int | None, sample: bool, seed: int,
                   max_history: int | None = None) -> list[Example]:
    """The split's examples (histories cut to ``max_history``, default whole): all users, the
    first ``users``, or a seeded sample of ``users`` (data order)."""
    examples = data.split(split, max_history)
    if not users or users >= len(examples):
        return examples
    if not sample:
        return examples[:users]
    keep = set(random.Random(seed).sample(range(len(examples)), users))
    return [ex for i, ex in enumerate(examples) if i in keep]


def ranker_fusion(ranker: Any, assist: bool = True, weight: float | None = None, renormalise: bool | None = None,
                  mixture: bool | None = None) -> Callable[[Sequence[Example]], Fusion]:
    """Per batch of examples: the ranker's step scoring for their histories."""
    def fusion(chunk: Sequence[Example]) -> Fusion:
        histories = [[ranker.catalog.index(i) for i in ex.history] for ex in chunk]
        return ranker.fusion(histories, assist, weight, renormalise, mixture)

    return fusion


def rank_split(
    backend: Backend, prompts: PromptBuilder, data: Dataset, split: Split, k: int, beams: int | None,
    progress: bool = True, batch_users: int = 8, examples: list[Example] | None = None,
    fusion: Callable[[Sequence[Example]], Fusion] | None = None, exclude_history: bool = False,
    search_errors: bool = False, shortlist: int = 0,
) -> dict[str, Any]:
    """Full-catalog top-k for every user of the split, or for ``examples`` when given
    (``batch_users`` users per batch); metrics and per-user target ranks; ``exclude_history``:
    the user's history items never enter the list. Users are batched in
    order of their prompts' padded width, because a batch only runs prompts of one width
    together (:func:`prompt_width`). ``fusion`` gives each batch's step scoring (default: the LLM's
    log-probability); ``shortlist``: fused lists from the assistant's shortlist of that size
    (:func:`~hatllm_edge.ranking.search.full_catalog`). ``search_errors``: score each missed
    target exactly and count the users whose target outscores the list's k-th item
    (:func:`target_search_errors`)."""
    if examples is None:
        examples = data.split(split)
    titles = {ex.user_id: [data.catalog.title(j) for j in ex.history] for ex in examples}
    order = sorted(examples, key=lambda ex: prompt_width(len(prompts.prompt(titles[ex.user_id]))))
    trie = TitleTrie.build(data.catalog, prompts)
    ranks: dict[str, int | None] = {}
    checks: list[dict[str, Any]] = []
    start = time.time()
    bar = tqdm(total=len(examples), desc=f"evaluate {split}", disable=not progress, unit="user")
    for i in range(0, len(order), batch_users):
        chunk = order[i : i + batch_users]
        scoring = fusion(chunk) if fusion else Fusion()
        exclude = [data.seen(ex.user_id, split) for ex in chunk] if exclude_history else None
        ranked = full_catalog(backend, prompts, trie, data.catalog, [titles[ex.user_id] for ex in chunk], k, beams, scoring,
                              shortlist, exclude)
        for ex, r in zip(chunk, ranked):
            ranks[ex.user_id] = target_rank([data.catalog.item_ids[j] for j in r.items], ex.target)
        if search_errors:
            checks += target_search_errors(backend, prompts, trie, data, chunk, [titles[ex.user_id] for ex in chunk],
                                           ranked, ranks, scoring, k, exclude)
        bar.update(len(chunk))
    bar.close()
    wall = time.time() - start
    search = None
    if search_errors:
        bound = dict(ranks) | {c["user"]: c["rank_bound"] for c in checks if c["error"]}
        search = {"missed_targets": len(checks), "errors": sum(c["error"] for c in checks),
                  "metrics_errors_fixed": mean_metrics([bound[ex.user_id] for ex in examples]), "users": checks}
    return {
        "split": split,
        "history": "excluded" if exclude_history else "included",
        "users": len(examples),
        "metrics": mean_metrics(list(ranks.values())),
        "wall_s": round(wall, 1),
        "s_per_user": round(wall / max(1, len(examples)), 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "ranks": {ex.user_id: ranks[ex.user_id] for ex in examples},
        **({"search_errors": search} if search else {}),
    }


def target_search_errors(backend: Backend, prompts: PromptBuilder, trie: TitleTrie, data: Dataset, chunk: Sequence[Example],
                         histories: Sequence[Sequence[str]], ranked: Sequence[Ranked], ranks: dict[str, int | None],
                         scoring: Fusion, k: int, exclude: Sequence[Collection[int]] | None = None) -> list[dict[str, Any]]:
    """Beam search's errors on the answers that matter, without ranking the whole catalog: each
    target the list missed is scored exactly (as candidate scoring scores a title, the same
    score beam search would give it); if it beats the list's k-th score, the search pruned a
    title it should have kept (an error for certain; the exact top-k may hold other missed
    titles too, so ``rank_bound``, the target's place among the listed scores, is the best
    rank exact search could give it). ``exclude``: each user's items the list may not hold; a
    target among them (a repeat the data allows) is no search error. Nor is a target whose
    title the list holds (another item of that title): the search kept the title, and the two
    tie (their scores differ by the layouts' rounding alone); the cut at k left it out."""
    skip = exclude if exclude is not None else [frozenset()] * len(chunk)
    missed = [j for j, ex in enumerate(chunk) if ranks[ex.user_id] is None and len(ranked[j].scores) == k
              and data.catalog.index(ex.target) not in skip[j]]
    if not missed:
        return []
    bonus = [scoring.title_bonus(j, data.catalog, skip[j]) for j in missed] if scoring.prior is not None else None
    exact = score_candidates(backend, prompts, [histories[j] for j in missed],
                             [[data.catalog.title(chunk[j].target)] for j in missed], bonus=bonus,
                             renormalise=trie if scoring.renormalise else None)
    if scoring.mixed:
        exact = [scoring.mix(j, data.catalog, [data.catalog.title(chunk[j].target)], r, skip[j]) for j, r in zip(missed, exact)]
    out = []
    for j, scored in zip(missed, exact):
        score, listed = scored.scores[0], ranked[j].scores
        title_listed = data.catalog.title(chunk[j].target) in {data.catalog.titles[i] for i in ranked[j].items}
        out.append({"user": chunk[j].user_id, "target_score": round(score, 4), "kth_score": round(listed[-1], 4),
                    "error": score > listed[-1] and not title_listed, "rank_bound": sum(s > score for s in listed)})
    return out
