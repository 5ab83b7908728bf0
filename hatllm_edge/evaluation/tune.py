"""Choose how beam steps are scored, on the validation split: trie renormalisation on or off,
and the weight of the collaborative assistant (SASRec) fused into every step, or over its
shortlist, as a weighted sum of log-probabilities or a mixture of probabilities. The winner (by
NDCG@10 on a seeded user sample, ties to the simpler setting) can be written into the
checkpoint: its ``hatllm.json`` gets a ``decoding`` section, the assistant's ``sasrec.json``
and ``sasrec.onnx`` are copied beside the weights, and every bundle built from it carries both."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Sequence

from hatllm_edge.app.models import model_kind
from hatllm_edge.core.data import Catalog, Dataset, history_protocol
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    ASSISTANT_CONFIG,
    ASSISTANT_ONNX,
    CATALOG_FILE,
    CHECKPOINT_META,
    Decoding,
    ModelMeta,
)
from hatllm_edge.core.limits import beam_width
from hatllm_edge.ranking.assistant import Assistant
from hatllm_edge.ranking.loo import rank_split, ranker_fusion, split_examples
from hatllm_edge.ranking.ranker import Ranker


@dataclass(frozen=True)
class TuneConfig:
    assistant: Path  # SASRec checkpoint folder (sasrec.json + sasrec.onnx)
    weights: Sequence[float] = (0.0, 0.5, 1.0, 2.0)
    renormalise: Sequence[bool] = (False, True)
    users: int = 300  # validation users (0 = all): a seeded sample, or the first N with sample=False
    sample: bool = True
    seed: int = 0
    k: int = 10
    beams: int | None = None
    batch_users: int = 8
    exclude_history: bool = False  # True: rank as `rank` and `serve` do, the history left out; False: loo-full as published
    shortlists: Sequence[int] = (0,)  # with each weight > 0: 0 = fused beam search, N = the assistant's N best scored exactly
    shares: Sequence[float] = ()  # mixtures: the assistant's share, each with every shortlist size > 0


def _check_grid(cfg: TuneConfig) -> None:
    if any(w < 0 for w in cfg.weights):
        raise InputError(f"assistant weights must be >= 0, got {list(cfg.weights)}")
    if any(n < 0 for n in cfg.shortlists):
        raise InputError(f"shortlist sizes must be >= 0, got {list(cfg.shortlists)}")
    if any(not 0 < s < 1 for s in cfg.shares):
        raise InputError(f"mixture shares must lie between 0 and 1 (exclusive), got {list(cfg.shares)}")
    if cfg.shares and not any(cfg.shortlists):
        raise InputError(f"mixtures {list(cfg.shares)} score whole titles, so they rank a shortlist: add a size > 0 to --shortlists")


def check_tune(cfg: TuneConfig, model: Path) -> None:
    """Refuse, before a model is built or loaded, a grid out of range or an assistant that cannot
    serve ``model`` (the folder's catalog, when it has one: the ranker checks it otherwise)."""
    _check_grid(cfg)
    if (Path(model) / CATALOG_FILE).is_file():
        Assistant.open(cfg.assistant, Catalog.from_jsonl(Path(model) / CATALOG_FILE))


def tune(ranker: Ranker, data: Dataset, cfg: TuneConfig, progress: bool = True) -> dict[str, Any]:
    """Every (renormalise, weight, shortlist) setting on the same validation users of ``data``
    (a shortlist only with a weight > 0: it is drawn from the assistant); the best by NDCG@10."""
    _check_grid(cfg)
    ranker.assistant = Assistant.open(cfg.assistant, ranker.catalog)
    if data.catalog.item_ids != ranker.catalog.item_ids:
        raise InputError("the model's catalog differs from its data set's; tune on the data it was trained on")
    examples = split_examples(data, "valid", cfg.users or None, cfg.sample, cfg.seed)
    width = beam_width(cfg.k, cfg.beams)
    protocol = history_protocol(data, examples, "valid", cfg.exclude_history)  # warns before the grid runs
    rows = []
    settings = [(renormalise, weight, shortlist, False) for renormalise, weight in product(cfg.renormalise, cfg.weights)
                for shortlist in (sorted(set(cfg.shortlists)) if weight else [0])]
    settings += [(True, share, shortlist, True) for share in cfg.shares  # a mixture reads the LLM's probabilities: renormalised
                 for shortlist in sorted(set(cfg.shortlists) - {0})]
    for renormalise, weight, shortlist, mixture in settings:
        result = rank_split(ranker.backend, ranker.prompts, data, "valid", cfg.k, width, progress=progress,
                            batch_users=cfg.batch_users, examples=examples,
                            fusion=ranker_fusion(ranker, weight > 0, weight, renormalise, mixture), exclude_history=cfg.exclude_history,
                            shortlist=shortlist)
        rows.append({"renormalise": renormalise, "assistant_weight": weight, "shortlist": shortlist, "mixture": mixture,
                     "metrics": result["metrics"], "s_per_user": result["s_per_user"], "ranks": result["ranks"]})
    # best NDCG@10; on a tie the simpler setting (no renormalisation, the product, smaller weight, beam search) wins
    best = max(rows, key=lambda r: (round(r["metrics"]["NDCG@10"], 12), -r["renormalise"], -r["mixture"], -r["assistant_weight"],
                                    -r["shortlist"]))
    return {"backend": ranker.label, "assistant": str(cfg.assistant), "split": "valid", "users": len(examples),
            **protocol,
            "seed": cfg.seed, "k": cfg.k, "beams": width, "grid": rows,
            "chosen": {"renormalise": best["renormalise"], "assistant_weight": best["assistant_weight"],
                       "shortlist": best["shortlist"], "mixture": best["mixture"], "metrics": best["metrics"]}}


def check_decoding_target(checkpoint: Path) -> None:
    """Refuse, before any tuning, a folder :func:`write_decoding` cannot store into."""
    if model_kind(checkpoint) != "checkpoint":
        raise InputError(f"{checkpoint}: the decoding is written into a training checkpoint (bundles are built from it); "
                         "run fuse on the checkpoint, or drop --write")


def write_decoding(checkpoint: Path, assistant_dir: Path, result: dict[str, Any]) -> None:
    """Store the chosen decoding in ``checkpoint`` and copy the assistant beside it."""
    check_decoding_target(checkpoint)
    meta = ModelMeta.read(checkpoint / CHECKPOINT_META)
    chosen = result["chosen"]
    if chosen["assistant_weight"] > 0:
        for name in (ASSISTANT_CONFIG, ASSISTANT_ONNX):
            shutil.copyfile(assistant_dir / name, checkpoint / name)
    meta.decoding = Decoding(chosen["renormalise"], chosen["assistant_weight"],
                             {"split": "valid", "users": result["users"], "seed": result["seed"], "backend": result["backend"],
                              "history": result["history"], "metrics": chosen["metrics"], "grid": [{k: v for k, v in r.items() if k != "ranks"} for r in result["grid"]]},
                             shortlist=chosen["shortlist"], mixture=chosen.get("mixture", False))
    meta.write(checkpoint / CHECKPOINT_META)
