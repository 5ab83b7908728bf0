"""``loo-full`` evaluation: full-catalog top-K by constrained beam search on any backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hatllm_edge.core.data import Split, history_protocol, load_dataset
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.limits import beam_width
from hatllm_edge.core.metrics import CUTOFFS, mean_metrics, target_rank
from hatllm_edge.engine.backend import Compute
from hatllm_edge.ranking.loo import rank_split, ranker_fusion, split_examples

log = logging.getLogger("hatllm_edge")


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: Path
    split: Split = "test"
    users: int | None = None  # N users of the split: the first N, or a seeded sample with ``sample``
    k: int = 10
    beams: int | None = None  # None: limits.DEFAULT_BEAMS; the search runs max(beams, k) wide
    bf16: bool = False  # checkpoints only: bf16 weights
    nf4: bool = False  # checkpoints only: bitsandbytes NF4 decoder Linears (the nf4 bundle's reference)
    batch_users: int = 8
    device: Literal["cpu", "cuda"] = "cpu"  # bundles only
    threads: int | None = None  # bundles only: ONNX Runtime intra-op threads
    compute: Compute = "auto"  # bundles only: see OnnxBackend
    dataset: str = "ml-100k"
    interactions: Path | None = None
    items: Path | None = None
    assist: bool = True  # fuse the model folder's assistant, when it has one
    assistant: Path | None = None  # or this SASRec checkpoint (sasrec.json + sasrec.onnx)
    assistant_weight: float | None = None  # None: the model's validated weight
    renormalise: bool | None = None  # None: the model's validated choice
    seed: int = 0  # the user sample when ``users`` is given with ``sample``
    sample: bool = False  # ``users``: a seeded sample instead of the first N
    exclude_history: bool = False  # loo-full ranks the whole catalog; True: the user's history is left out
    search_errors: bool = False  # score missed targets exactly: beam search's errors on them
    shortlist: int | None = None  # fused lists from the assistant's N most likely items; None: the model's decoding
    mixture: bool | None = None  # the models' probabilities mixed (weight: the assistant's share); None: the model's decoding


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint (PyTorch: fp32 or bf16 weights, or bitsandbytes NF4) or an ONNX
    bundle (the engine)."""
    from hatllm_edge.app.models import model_kind, open_model

    if cfg.k < max(CUTOFFS):
        above = [c for c in CUTOFFS if c > cfg.k]
        log.warning("--k %d: the metrics at %s read a %d-item list, so they are the metrics at %d", cfg.k,
                    ", ".join(map(str, above)), cfg.k, cfg.k)
    if cfg.assistant is not None and not cfg.assist:
        raise InputError(f"--assistant {cfg.assistant} with --no-assist: the assistant would not be fused; drop one of them")
    if cfg.shortlist and (not cfg.assist or cfg.assistant_weight == 0):  # known before the model loads
        raise InputError(f"--shortlist {cfg.shortlist} draws the list from the assistant, which "
                         f"{'--no-assist' if not cfg.assist else '--assistant-weight 0'} leaves out; drop one of them")
    if cfg.mixture and (not cfg.assist or cfg.assistant_weight == 0):
        raise InputError(f"--mixture mixes in the assistant, which {'--no-assist' if not cfg.assist else '--assistant-weight 0'} "
                         "leaves out; drop one of them")
    if cfg.mixture and cfg.renormalise is False:
        raise InputError("--mixture reads the LLM's title probabilities over the catalog, which --no-renormalise gives up; "
                         "drop one of them")
    if cfg.mixture and cfg.shortlist == 0:
        raise InputError("--mixture scores whole titles, so it ranks a shortlist: pass --shortlist N (N > 0), not 0")
    if cfg.mixture and cfg.assistant_weight is not None and not 0 < cfg.assistant_weight < 1:
        raise InputError(f"--assistant-weight {cfg.assistant_weight} with --mixture: the weight is then the assistant's "
                         "share, between 0 and 1 (exclusive)")
    kind = model_kind(cfg.checkpoint)
    ranker = open_model(cfg.checkpoint, cfg.device, cfg.threads, cfg.bf16, cfg.compute, cfg.nf4)
    data = load_dataset(cfg.dataset, cfg.interactions, cfg.items)
    if data.catalog.item_ids != ranker.catalog.item_ids:
        raise InputError(f"{cfg.checkpoint}: its catalog differs from data set {data.name!r}; evaluate on the data it was trained on")
    if cfg.assistant is not None:
        from hatllm_edge.ranking.assistant import Assistant

        ranker.assistant = Assistant.open(cfg.assistant, ranker.catalog, cfg.threads)
    width = beam_width(cfg.k, cfg.beams)
    examples = split_examples(data, cfg.split, cfg.users, cfg.sample, cfg.seed)
    fusion = ranker_fusion(ranker, cfg.assist, cfg.assistant_weight, cfg.renormalise, cfg.mixture)
    renormalise, weight = ranker.scoring(cfg.assist, cfg.assistant_weight, cfg.renormalise)
    mixture = bool(weight) and (ranker.decoding.mixture if cfg.mixture is None else cfg.mixture)
    if weight and cfg.mixture is not None and cfg.mixture != ranker.decoding.mixture and cfg.assistant_weight is None:
        raise InputError(f"{'--mixture' if cfg.mixture else '--product'}: {cfg.checkpoint}'s weight {weight:g} was chosen for "
                         f"{'a mixture (a share)' if ranker.decoding.mixture else 'the product'}; pass --assistant-weight for this one")
    if mixture and not 0 < weight < 1:
        raise InputError(f"assistant weight {weight:g}: in a mixture it is the assistant's share, between 0 and 1 (exclusive); "
                         "pass --assistant-weight")
    if mixture and not renormalise:
        raise InputError("a mixture reads the LLM's title probabilities over the catalog: evaluate it with --renormalise")
    if cfg.assistant is not None and cfg.assistant_weight is None and not weight:
        raise InputError(f"--assistant {cfg.assistant}: {cfg.checkpoint} has no fusion weight of its own (its decoding says 0); "
                         "pass --assistant-weight (hatllm-edge fuse chooses one on validation)")
    if cfg.shortlist and not weight:
        raise InputError(f"--shortlist {cfg.shortlist} draws the list from the assistant, which is not fused here (weight 0); "
                         "pass --assistant and --assistant-weight, or drop --shortlist")
    shortlist = ranker.shortlist(cfg.shortlist) if weight else 0
    if mixture and not shortlist:
        raise InputError("a mixture scores whole titles, so it ranks a shortlist: pass --shortlist N (N > 0)")
    protocol = history_protocol(data, examples, cfg.split, cfg.exclude_history)  # warns before the hours of ranking
    result = rank_split(ranker.backend, ranker.prompts, data, cfg.split, cfg.k, width, progress=progress,
                        batch_users=cfg.batch_users, examples=examples, fusion=fusion, exclude_history=cfg.exclude_history,
                        search_errors=cfg.search_errors, shortlist=shortlist)
    return {
        "checkpoint": str(cfg.checkpoint),
        "schedule": ranker.meta.schedule,
        "backend": ranker.label,
        "decoding": {"renormalise": renormalise, "assistant_weight": weight, "shortlist": shortlist, "mixture": mixture,
                     "assistant": str(ranker.assistant.folder) if ranker.assistant and weight else None},
        "users_sample": {"seed": cfg.seed} if cfg.sample and cfg.users else None,
        "k": cfg.k,
        "beams": width,
        "batch_users": cfg.batch_users,
        "threads": cfg.threads if kind == "bundle" else _torch_threads(),
        **result,
        **protocol,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def popularity_baseline(split: Split, dataset: str = "ml-100k", interactions: Path | None = None, items: Path | None = None,
                        exclude_history: bool = False) -> dict[str, Any]:
    """Most-popular items (training-part counts): the same list for every user, or with
    ``exclude_history`` the most popular items each user has not had yet."""
    data = load_dataset(dataset, interactions, items)
    ranking = data.popularity()
    ranks = {}
    examples = data.split(split, 1)
    for ex in examples:
        seen = {data.catalog.item_ids[i] for i in data.seen(ex.user_id, split)} if exclude_history else set()
        ranks[ex.user_id] = target_rank([i for i in ranking if i not in seen][:10], ex.target)
    return {"model": "most-popular", "split": split, **history_protocol(data, examples, split, exclude_history),
            "users": len(ranks), "metrics": mean_metrics(list(ranks.values())), "ranks": ranks}
