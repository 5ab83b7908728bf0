"""One ranking interface over any backend: a model's backend, prompt builder and catalog;
``top_k`` (full catalog) and ``score`` (candidates).

:meth:`Ranker.from_bundle` opens the engine (no torch); a PyTorch checkpoint is opened by
:func:`hatllm_edge.app.models.open_model`, which lives above the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    ASSISTANT_CONFIG,
    BUNDLE_META,
    CATALOG_FILE,
    TOKENIZER_FILE,
    Decoding,
    ModelMeta,
)
from hatllm_edge.core.limits import beam_width
from hatllm_edge.core.prompt import TEMPLATES, PromptBuilder
from hatllm_edge.engine.backend import Backend, Compute, Device, Optimization
from hatllm_edge.engine.bundle import read_bundle_meta
from hatllm_edge.ranking.assistant import Assistant
from hatllm_edge.ranking.candidates import score_candidates
from hatllm_edge.ranking.resolve import Resolver
from hatllm_edge.ranking.scoring import Fusion, Ranked
from hatllm_edge.ranking.search import full_catalog
from hatllm_edge.ranking.trie import TitleTrie


@dataclass
class Ranker:
    """``meta.decoding`` (written by ``hatllm-edge fuse``) says how steps are scored by
    default: ``renormalise`` over the trie's children, and ``assistant_weight``, the weight of
    the collaborative assistant (SASRec, ``sasrec.json``/``sasrec.onnx`` in the model folder)
    chosen on validation."""

    backend: Backend
    prompts: PromptBuilder
    catalog: Catalog
    meta: ModelMeta
    assistant: Assistant | None = None
    _trie: TitleTrie | None = field(default=None, repr=False)
    _resolver: Resolver | None = field(default=None, repr=False)

    @classmethod
    def from_bundle(cls, folder: Path | str, device: Device = "cpu", threads: int | None = None,
                    compute: Compute = "auto", optimization: Optimization = "all", cuda_graph: bool = False) -> "Ranker":
        """An ONNX Runtime ranker from an exported bundle (manifest checked); ``cuda_graph``:
        passes replayed as captured CUDA graphs."""
        from hatllm_edge.engine.session import OnnxBackend

        folder = Path(folder)
        backend = OnnxBackend.from_bundle(folder, device=device, threads=threads, compute=compute, optimization=optimization,
                                          cuda_graph=cuda_graph)
        ranker = cls._assemble(backend, folder, read_bundle_meta(folder))
        ranker.assistant = open_assistant(folder, ranker.catalog, threads)
        return ranker

    @classmethod
    def _assemble(cls, backend: Backend, folder: Path, meta: ModelMeta) -> "Ranker":
        if meta.prompt.template not in TEMPLATES:
            raise InputError(f"bundle {folder}: {BUNDLE_META} names prompt template {meta.prompt.template!r}, not one of "
                             f"{TEMPLATES}; re-export the bundle")
        try:
            prompts = PromptBuilder.from_meta(folder / TOKENIZER_FILE, meta.prompt)
        except InputError:
            raise
        except Exception as e:  # the tokenizers library raises plain Exceptions on a bad file
            raise InputError(f"bundle {folder}: tokenizer.json does not load ({' '.join(str(e).split())[:200]}); "
                             "re-export the bundle") from None
        return cls(backend, prompts, Catalog.from_jsonl(folder / CATALOG_FILE), meta)

    @property
    def label(self) -> str:
        """What runs (the backend's label): ``onnx-<quant>-<dtype>-<device>-<compute>`` or ``torch-<fp32|bf16|nf4>``."""
        return self.backend.label

    @property
    def trie(self) -> TitleTrie:
        if self._trie is None:
            self._trie = TitleTrie.build(self.catalog, self.prompts)
        return self._trie

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver(self.catalog)
        return self._resolver

    def resolve(self, refs: Sequence[Any], where: str) -> list[int]:
        """Catalog indices of items given by id or exact title; one error names every entry
        that is not in the catalog, each with its nearest titles (:class:`Resolver`)."""
        return self.resolver.resolve(refs, where)

    def titles(self, indices: Sequence[int]) -> list[str]:
        return [self.catalog.titles[i] for i in indices]

    @property
    def decoding(self) -> Decoding:
        return self.meta.decoding or Decoding()

    def scoring(self, assist: bool = True, weight: float | None = None, renormalise: bool | None = None) -> tuple[bool, float]:
        """(renormalise, assistant weight) in effect: the model's validated defaults unless
        overridden; the weight is 0 without ``assist`` or without an assistant in the model folder."""
        renormalise = self.decoding.renormalise if renormalise is None else renormalise
        if weight is None:
            weight = self.decoding.assistant_weight
        if weight < 0:
            raise InputError(f"assistant weight {weight}: must be >= 0")
        return renormalise, (weight if assist and self.assistant is not None else 0.0)

    def fusion(self, histories: Sequence[Sequence[int]], assist: bool = True, weight: float | None = None,
               renormalise: bool | None = None, mixture: bool | None = None) -> Fusion:
        """How steps are scored for these histories (see :meth:`scoring`); ``mixture``: the
        models' probabilities mixed, the weight then the assistant's share (default: the
        model's decoding)."""
        renormalise, weight = self.scoring(assist, weight, renormalise)
        mixture = self.decoding.mixture if mixture is None else mixture
        if not weight:
            return Fusion(renormalise)
        if mixture and not 0 < weight < 1:
            raise InputError(f"assistant weight {weight}: in a mixture it is the assistant's share, between 0 and 1 (exclusive)")
        if mixture and not renormalise:
            raise InputError("a mixture needs the LLM's title probabilities over the catalog, which the trie renormalisation "
                             "gives: rank it renormalised (--renormalise)")
        prior = self.assistant.logprobs([[self.catalog.item_ids[i] for i in h] for h in histories])  # type: ignore[union-attr]
        return Fusion(renormalise, weight, prior, mixture)

    def shortlist(self, size: int | None = None) -> int:
        """The shortlist size in effect (:class:`~hatllm_edge.core.formats.Decoding`): the
        model's unless overridden; 0 is beam search."""
        size = self.decoding.shortlist if size is None else size
        if size < 0:
            raise InputError(f"shortlist {size}: must be >= 0 (0: beam search over the title tree)")
        return size

    def top_k(self, histories: Sequence[Sequence[int]], k: int = 10, beams: int | None = None, assist: bool = True,
              weight: float | None = None, renormalise: bool | None = None, exclude_history: bool = False,
              shortlist: int | None = None, mixture: bool | None = None) -> list[Ranked]:
        """Full-catalog top-k for each history (catalog indices, oldest first), scored as
        :meth:`fusion` says: with the assistant fused and a :meth:`shortlist`, its most likely
        items scored exactly; else a beam search :func:`~hatllm_edge.core.limits.beam_width`
        wide: ``beams`` (default 10), at least ``k``. ``exclude_history``: the history's items
        never enter the list (k others are found)."""
        return full_catalog(self.backend, self.prompts, self.trie, self.catalog, [self.titles(h) for h in histories], k,
                            beam_width(k, beams), self.fusion(histories, assist, weight, renormalise, mixture), self.shortlist(shortlist),
                            [set(h) for h in histories] if exclude_history else None)

    def score(self, history: Sequence[int], candidates: Sequence[int], normalize: bool = False, assist: bool = True,
              weight: float | None = None, renormalise: bool | None = None) -> Ranked:
        """Candidates (catalog indices) ranked by log-probability (plus the assistant's share,
        as in :meth:`top_k`); items index ``candidates``."""
        return self.score_batch([history], [candidates], normalize, assist, weight, renormalise)[0]

    def score_batch(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                    normalize: bool = False, assist: bool = True, weight: float | None = None,
                    renormalise: bool | None = None, mixture: bool | None = None) -> list[Ranked]:
        """:meth:`score` for several users in one batch (prompts and candidate passes shared).
        Scored as :meth:`fusion` says, so a candidate's score is what :meth:`top_k` gives its title."""
        fusion = self.fusion(histories, assist, weight, renormalise, mixture)
        if fusion.mixed and normalize:
            raise InputError("--length-normalise divides a title's log-probability by its length; a mixture needs the "
                             "probabilities themselves: drop --length-normalise, or rank with --no-assist")
        bonus = [fusion.title_bonus(u, self.catalog) for u in range(len(histories))] if fusion.prior is not None else None
        titles = [self.titles(c) for c in candidates]
        ranked = score_candidates(self.backend, self.prompts, [self.titles(h) for h in histories], titles, normalize,
                                  bonus=bonus, renormalise=self.trie if fusion.renormalise else None)
        if fusion.mixed:
            ranked = [fusion.mix(u, self.catalog, titles[u], r) for u, r in enumerate(ranked)]
        return ranked


def open_assistant(folder: Path, catalog: Catalog, threads: int | None = None) -> Assistant | None:
    """The collaborative assistant shipped in a model folder, if there is one."""
    if not (folder / ASSISTANT_CONFIG).is_file():
        return None
    return Assistant.open(folder, catalog, threads)
