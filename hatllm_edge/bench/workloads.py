"""Request shapes of the benchmark (``cand<C>-h<H>-b<B>``, ``top<K>-h<H>-b<B>``) and their seeded
requests: real MovieLens-100K histories (the last H items before each test target),
candidates = the target plus seeded random catalog items."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from hatllm_edge.core.data import Dataset, candidate_set
from hatllm_edge.core.errors import InputError

CAND_TARGET, TOPK_TARGET = "cand100-h20-b1", "top10-h10-b1"  # the workloads the verdict compares on

Request = tuple[list[list[int]], list[list[int]]]  # (histories, candidate lists) of catalog indices


@dataclass(frozen=True)
class Workload:
    """One request shape: ``candidates`` > 0 scores that many titles per user, 0 is the
    full-catalog top-``k`` beam search; ``batch`` users per request."""

    kind: Literal["candidates", "topk"]
    history: int
    batch: int
    candidates: int = 0
    k: int = 10

    @property
    def name(self) -> str:
        what = f"cand{self.candidates}" if self.kind == "candidates" else f"top{self.k}"
        return f"{what}-h{self.history}-b{self.batch}"

    @classmethod
    def parse(cls, name: str) -> "Workload":
        """``cand<C>-h<H>-b<B>`` or ``top<K>-h<H>-b<B>``, e.g. ``cand100-h20-b1``."""
        match = re.fullmatch(r"(cand|top)(\d+)-h(\d+)-b(\d+)", name.strip())
        if not match or min(int(g) for g in match.groups()[1:]) < 1:
            raise InputError(f"workload {name!r}: expected cand<C>-h<H>-b<B> or top<K>-h<H>-b<B> with positive numbers, "
                             "e.g. cand100-h20-b1 or top10-h10-b8")
        what, n, h, b = match.group(1), *(int(g) for g in match.groups()[1:])
        if what == "cand":
            return cls("candidates", h, b, candidates=n)
        return cls("topk", h, b, k=n)


def default_workloads() -> list[Workload]:
    """Candidate ranking (history 5/10/20 x 20/100 candidates) and full-catalog top-10
    (history 10), each at batch 1 and 8."""
    out = [Workload("candidates", h, b, c) for b in (1, 8) for h in (5, 10, 20) for c in (20, 100)]
    return out + [Workload("topk", 10, b) for b in (1, 8)]



def make_requests(data: Dataset, w: Workload, seed: int, count: int) -> list[Request]:
    """``count`` seeded requests of ``w.batch`` users each."""
    rng = random.Random(f"{seed}-{w.name}")
    examples = [ex for ex in data.split("test", w.history) if len(ex.history) >= w.history]
    catalog = data.catalog
    if len(examples) < w.batch:
        raise InputError(f"workload {w.name}: only {len(examples)} test users have {w.history} history items, "
                         f"the batch needs {w.batch}")
    if w.candidates > len(catalog):
        raise InputError(f"workload {w.name}: {w.candidates} candidates, but the catalog has {len(catalog)} items")
    out = []
    for _ in range(count):
        users = rng.sample(examples, w.batch)
        histories = [[catalog.index(i) for i in ex.history] for ex in users]
        cands: list[list[int]] = []
        for ex in users:
            if w.kind == "candidates":
                cands.append(candidate_set(len(catalog), catalog.index(ex.target), w.candidates, rng))
        out.append((histories, cands))
    return out

