"""``loo-full`` ranking of a data split: every user's full-catalog top-k by constrained beam
search on any backend, with the target's rank. Validation during training and ``evaluate``
both run it."""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Sequence

from tqdm import tqdm

from hatllm_edge.core.data import Dataset, Example, Split
from hatllm_edge.core.machine import peak_rss_mib
from hatllm_edge.core.metrics import mean_metrics, target_rank
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.engine.backend import Backend
from hatllm_edge.ranking.search import Fusion, TitleTrie, beam_search, prompt_width


def split_examples(data: Dataset, split: Split, max_history: int, users: int | None, sample: bool, seed: int) -> list[Example]:
    """The split's examples: all, the first ``users``, or a seeded sample of ``users`` (data order)."""
    examples = data.split(split, max_history)
    if not users or users >= len(examples):
        return examples
    if not sample:
        return examples[:users]
    keep = set(random.Random(seed).sample(range(len(examples)), users))
    return [ex for i, ex in enumerate(examples) if i in keep]


def ranker_fusion(ranker: Any, assist: bool = True, weight: float | None = None, renormalise: bool | None = None
                  ) -> Callable[[Sequence[Example]], Fusion]:
    """Per batch of examples: the ranker's step scoring for their histories."""
    def fusion(chunk: Sequence[Example]) -> Fusion:
        histories = [[ranker.catalog.index(i) for i in ex.history] for ex in chunk]
        return ranker.fusion(histories, assist, weight, renormalise)

    return fusion


def rank_split(
    backend: Backend, prompts: PromptBuilder, data: Dataset, split: Split, k: int, beams: int | None,
    users: int | None = None, progress: bool = True, batch_users: int = 8, examples: list[Example] | None = None,
    fusion: Callable[[Sequence[Example]], Fusion] | None = None, exclude_history: bool = False,
) -> dict[str, Any]:
    """Beam-search top-k for every user of the split, or for ``examples`` when given
    (``batch_users`` users per batch); metrics and per-user target ranks; ``exclude_history``:
    the user's history items never enter the list. Users are batched in
    order of their prompts' padded width, because a batch only runs prompts of one width
    together (:func:`prompt_width`). ``fusion`` gives each batch's step scoring (default: the LLM's
    log-probability)."""
    if examples is None:
        examples = data.split(split, prompts.max_history)[:users]
    titles = {ex.user_id: [data.catalog.title(j) for j in ex.history] for ex in examples}
    order = sorted(examples, key=lambda ex: prompt_width(len(prompts.prompt(titles[ex.user_id]))))
    trie = TitleTrie.build(data.catalog, prompts)
    ranks: dict[str, int | None] = {}
    start = time.time()
    bar = tqdm(total=len(examples), desc=f"evaluate {split}", disable=not progress, unit="user")
    for i in range(0, len(order), batch_users):
        chunk = order[i : i + batch_users]
        ranked = beam_search(backend, prompts, trie, [titles[ex.user_id] for ex in chunk], k=k, beams=beams,
                             fusion=fusion(chunk) if fusion else Fusion(),
                             exclude=[data.seen(ex.user_id, split) for ex in chunk] if exclude_history else None)
        for ex, r in zip(chunk, ranked):
            ranks[ex.user_id] = target_rank([data.catalog.item_ids[j] for j in r.items], ex.target)
        bar.update(len(chunk))
    bar.close()
    wall = time.time() - start
    return {
        "split": split,
        "history": "excluded" if exclude_history else "included",
        "users": len(examples),
        "metrics": mean_metrics(list(ranks.values())),
        "wall_s": round(wall, 1),
        "s_per_user": round(wall / max(1, len(examples)), 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "ranks": {ex.user_id: ranks[ex.user_id] for ex in examples},
    }
