"""Attention skew, the HatLLM paper's diagnostic: do item tokens attend to their own item
more than to the other items of the history?

For every query token that belongs to an item (segment > 0) and every key the causal mask
allows (earlier, non-padding tokens; the query token itself is its own bucket), the
attention probability lands in one of four buckets::

    same      keys of the query's own item (earlier tokens of the same title)
    other     keys of any other item
    non_item  template tokens (segment 0)
    self      the query token itself            same + other + non_item + self = 1 per row

Per layer (probabilities averaged over heads, pooled over every item query token of every
example) we report the mean *total* mass per bucket and the mean *per-pair* mass (a bucket's
summed mass divided by its number of (query, key) pairs), and same/other ratios of both.
The paper finds a total-mass ratio of about 3 in a plainly fine-tuned LLM.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from hatllm_edge.core.data import Catalog, Dataset, Example, Split, load_dataset
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.masks import LayerSchedule
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.training.batching import Batch, make_batch
from hatllm_edge.training.model import HatLLM

BUCKETS = ("same", "other", "non_item", "self")
THIRDS = ("first", "middle", "last")


def bucket_masks(segments: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[4, B, L, L] float: which (query, key) pairs fall in each bucket (see module doc).

    segments [B, L] int (0 = no item), valid [B, L] bool (False = padding). Only item query
    rows are non-zero; keys must be earlier than the query (left padding keeps columns in
    sequence order) and valid.
    """
    length = segments.shape[1]
    sq, sk = segments[:, :, None], segments[:, None, :]  # [B, L, 1], [B, 1, L]
    item_query = ((segments > 0) & valid)[:, :, None]  # [B, L, 1]
    earlier = torch.ones(length, length, dtype=torch.bool).tril(-1)[None] & valid[:, None, :]  # [B, L, L]
    eye = torch.eye(length, dtype=torch.bool)[None]
    same = item_query & earlier & (sk == sq)
    other = item_query & earlier & (sk > 0) & (sk != sq)
    non_item = item_query & earlier & (sk == 0)
    itself = item_query & eye
    return torch.stack([same, other, non_item, itself]).float()


def layer_masses(probs: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """[4] float64: summed attention mass per bucket, heads averaged. probs [B, H, L, L]."""
    p = probs.float().mean(1)  # [B, L, L]
    return torch.einsum("bqk,cbqk->c", p, buckets).double()


class _Reducer(list):
    """Stands in for HatLLM.forward's ``attentions`` list: each layer's probabilities
    [B, H, L, L] are reduced to 4 bucket sums on arrival instead of being kept (the real model
    would otherwise hold 30 layers x 9 heads x ~200^2 floats per example)."""

    def __init__(self, buckets: torch.Tensor) -> None:
        super().__init__()
        self.buckets = buckets

    def append(self, probs: torch.Tensor) -> None:  # type: ignore[override]
        super().append(layer_masses(probs, self.buckets))


def summarize(masses: np.ndarray, counts: np.ndarray) -> dict[str, list[float | None]]:
    """Per-layer figures from accumulated sums: masses [L, 4] (bucket mass summed over item
    query rows), counts [4] (pairs per bucket; the self count is the number of item queries).
    Ratios are None where the other-item figure is 0 (e.g. IN-masked layers)."""
    queries = counts[3]
    out: dict[str, list[float | None]] = {b: (masses[:, i] / queries).tolist() for i, b in enumerate(BUCKETS)}
    for i, b in enumerate(BUCKETS[:3]):
        out[f"pair_{b}"] = (masses[:, i] / counts[i]).tolist() if counts[i] else [None] * len(masses)
    out["ratio"] = [_ratio(s, o) for s, o in zip(out["same"], out["other"])]
    out["pair_ratio"] = [_ratio(s, o) for s, o in zip(out["pair_same"], out["pair_other"])]
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def attention_skew(
    model: HatLLM,
    prompts: PromptBuilder,
    catalog: Catalog,
    examples: Sequence[Example],
    batch_size: int = 4,
    plain_masks: bool = False,
    progress: bool = False,
    desc: str = "analyze",
) -> dict[str, Any]:
    """Per-layer attention skew of ``model`` over ``examples`` (prompt + answer, as trained).

    By default each layer uses the mask its schedule gives it: this is the attention the model
    actually computes, and what shapes its outputs, so HatLLM's IN layers show zero other-item
    mass and its CR layers zero same-item mass, by construction. ``plain_masks=True`` forces
    the causal (OR) mask on every layer: it shows what the learned weights would do unmasked,
    but later layers then see hidden states the model was never trained on, so it is a
    counterfactual, not the default. For an all-OR model (base, causal fine-tune) both agree.
    """
    if not examples:
        raise InputError("attention skew needs at least one example")
    num_layers = model.schedule.num_layers
    masses = np.zeros((num_layers, len(BUCKETS)))
    counts = np.zeros(len(BUCKETS))
    # Short prompts together: less padding; the pooled sums do not depend on the order.
    order = sorted(examples, key=lambda ex: min(len(ex.history), prompts.max_history or len(ex.history)))
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="ex")
    model.eval()
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            batch = make_batch(order[i : i + batch_size], catalog, prompts)
            valid = _valid_columns(batch)
            buckets = bucket_masks(batch.segments, valid)
            masks = {k: batch.masks["or"] for k in batch.masks} if plain_masks else batch.masks
            reducer = _Reducer(buckets)
            last = torch.tensor([batch.input_ids.shape[1] - 1])  # logits are not needed: keep one column
            model(batch.input_ids, batch.position_ids, masks, logits_index=last, attentions=reducer)
            if len(reducer) != num_layers:
                raise RuntimeError(f"got attention from {len(reducer)} layers, expected {num_layers}")
            masses += torch.stack(list(reducer)).numpy()
            counts += buckets.sum((1, 2, 3)).double().numpy()
            bar.update(len(batch.input_ids))
    bar.close()
    return {
        "examples": len(examples),
        "item_queries": int(counts[3]),
        "pairs": {b: int(c) for b, c in zip(BUCKETS[:3], counts[:3])},
        "plain_masks": plain_masks,
        "schedule": model.schedule.to_dict(),
        "layer_kinds": ["or"] * num_layers if plain_masks else model.schedule.kinds,
        "layers": summarize(masses, counts),
    }


def _valid_columns(batch: Batch) -> torch.Tensor:
    """[B, L] bool, False for left padding: under the OR mask the last column (a real token
    in every row) sees exactly the row's real tokens."""
    return batch.masks["or"][:, 0, -1, :]


def layer_summary(layers: dict[str, list[float | None]], key: str = "ratio") -> dict[str, dict[str, Any]]:
    """Mean of a per-layer ratio over all layers and over the first/middle/last third, taken
    over the layers where it is defined; ``undefined`` counts the others (other mass 0)."""
    values = layers[key]
    parts = {"all": np.arange(len(values)), **dict(zip(THIRDS, np.array_split(np.arange(len(values)), 3)))}
    out = {}
    for name, idx in parts.items():
        defined = [values[i] for i in idx if values[i] is not None]
        out[name] = {"mean": float(np.mean(defined)) if defined else None, "undefined": len(idx) - len(defined)}
    return out


def sample_examples(data: Dataset, split: Split, n: int | None, seed: int, max_history: int) -> list[Example]:
    """A seeded sample of ``n`` examples of the split (all when ``n`` is None or larger)."""
    examples = data.split(split, max_history)
    if n is not None and n < len(examples):
        examples = random.Random(seed).sample(examples, n)
    return examples


@dataclass(frozen=True)
class AnalyzeConfig:
    checkpoints: tuple[Path, ...]
    labels: tuple[str, ...] = ()  # one per checkpoint; default: folder names
    include_base: bool = True  # also the untuned base model of the first checkpoint
    examples: int | None = 64
    split: Split = "valid"
    seed: int = 0
    batch_size: int = 4
    plain_masks: bool = False
    out_dir: Path = Path("analysis")
    dataset: str = "ml-100k"
    interactions: Path | None = None
    items: Path | None = None


def analyze(cfg: AnalyzeConfig, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Attention skew of the base model and each checkpoint on the same examples; writes
    ``skew.json`` and ``skew.png`` into ``cfg.out_dir``. Models are loaded one at a time."""
    from hatllm_edge.training.checkpoint import load_checkpoint
    from hatllm_edge.training.model import BaseModelSpec, load_base

    if not cfg.checkpoints:
        raise InputError("give at least one checkpoint folder")
    if cfg.split not in ("valid", "test"):
        raise InputError(f"split must be 'valid' or 'test', got {cfg.split!r}")
    if cfg.labels and len(cfg.labels) != len(cfg.checkpoints):
        raise InputError(f"{len(cfg.labels)} labels for {len(cfg.checkpoints)} checkpoints; give one --label per checkpoint or none")
    if cfg.batch_size < 1 or (cfg.examples is not None and cfg.examples < 1):
        raise InputError("--batch-size and --examples must be positive")
    labels = list(cfg.labels) or [p.name or str(p) for p in cfg.checkpoints]
    if len(set(labels)) != len(labels) or (cfg.include_base and "base" in labels):
        raise InputError(f"model labels must be unique (and not 'base' with the base model included): {labels}")

    data = load_dataset(cfg.dataset, cfg.interactions, cfg.items)
    results: dict[str, dict[str, Any]] = {}
    examples: list[Example] = []
    for n, (label, folder) in enumerate(zip(labels, cfg.checkpoints)):
        loaded = load_checkpoint(folder)
        if loaded.catalog.item_ids != data.catalog.item_ids:
            raise InputError(f"{folder}: its catalog differs from data set {data.name!r}; analyze on the data it was trained on")
        if n == 0:
            examples = sample_examples(data, cfg.split, cfg.examples, cfg.seed, loaded.prompts.max_history)
            if cfg.include_base:
                lm, _ = load_base(BaseModelSpec(**loaded.meta.base))
                base = HatLLM(lm, LayerSchedule(lm.config.num_hidden_layers))
                results["base"] = _run_one(base, loaded.prompts, data.catalog, examples, cfg, progress, "base")
                results["base"]["source"] = loaded.meta.base
                del base, lm
        results[label] = _run_one(loaded.model, loaded.prompts, data.catalog, examples, cfg, progress, label)
        results[label]["source"] = str(folder)
        del loaded
    write_skew(results, cfg.out_dir, {"split": cfg.split, "seed": cfg.seed, "data": data.name})
    return results


def _run_one(model: HatLLM, prompts: PromptBuilder, catalog: Catalog, examples: list[Example], cfg: AnalyzeConfig,
             progress: bool, label: str) -> dict[str, Any]:
    out = attention_skew(model, prompts, catalog, examples, cfg.batch_size, cfg.plain_masks, progress, label)
    out["summary"] = {key: layer_summary(out["layers"], key) for key in ("ratio", "pair_ratio")}
    return out


def write_skew(results: dict[str, dict[str, Any]], out_dir: Path, run: dict[str, Any] | None = None) -> None:
    """``skew.json`` (every number) and ``skew.png`` (the plot) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"run": run or {}, "models": results}
    (out_dir / "skew.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    plot_skew(results, out_dir / "skew.png")


def plot_skew(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per layer, one colour per model: same-item (solid) vs other-item (dashed) total mass,
    and the same/other ratio of total and per-pair mass. Ratios use a linear axis so that CR
    layers show as 0; IN layers (no other-item mass) leave gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (label, res) in enumerate(results.items()):
        layers, c = res["layers"], colors[n % len(colors)]
        x = np.arange(len(layers["same"]))
        axes[0].plot(x, layers["same"], color=c, marker=".", label=f"{label}: same item")
        axes[0].plot(x, layers["other"], color=c, ls="--", marker=".", label=f"{label}: other items")
        for ax, key in ((axes[1], "ratio"), (axes[2], "pair_ratio")):
            ax.plot(x, [math.nan if v is None else v for v in layers[key]], color=c, marker=".", label=label)
    axes[0].set(title="total attention mass from item tokens", xlabel="layer", ylabel="mass (mean per query)")
    axes[1].set(title="same / other items, total mass (gap: no other-item mass)", xlabel="layer", ylim=(0, None))
    axes[2].set(title="same / other items, per token pair", xlabel="layer", ylim=(0, None))
    for ax in axes[1:]:
        ax.axhline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def skew_table(results: dict[str, dict[str, Any]]) -> str:
    """A compact text table: mean same/other ratio over all layers and each third."""
    head = f"{'model':<20} {'masks':<8} " + " ".join(f"{'total ' + p:>12}" for p in ("all", *THIRDS)) + "  " + " ".join(
        f"{'pair ' + p:>12}" for p in ("all", *THIRDS)
    )
    lines, starred = [head], False
    for label, res in results.items():
        s = res["schedule"]
        masks = "plain" if res["plain_masks"] else f"{s['n_in']}/{s['num_layers'] - s['n_in'] - s['n_cr']}/{s['n_cr']}"
        cells = []
        for key in ("ratio", "pair_ratio"):
            for part in ("all", *THIRDS):
                cell = res["summary"][key][part] if "summary" in res else layer_summary(res["layers"], key)[part]
                text = "inf" if cell["mean"] is None else f"{cell['mean']:.2f}" + ("*" if cell["undefined"] else "")
                starred |= cell["undefined"] > 0 and cell["mean"] is not None
                cells.append(f"{text:>12}")
        lines.append(f"{label:<20} {masks:<8} " + " ".join(cells[:4]) + "  " + " ".join(cells[4:]))
    lines.append("masks: IN/OR/CR layers of the schedule, or 'plain' (OR forced on every layer)")
    if starred:
        lines.append("* mean over the layers with other-item mass > 0 (IN-masked layers have none: inf)")
    return "\n".join(lines)
