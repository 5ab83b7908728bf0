"""Prompt building with item segments: which history item each token belongs to.

Each piece of the template and each title is tokenised on its own and the ids are
concatenated, so segment boundaries are exact whatever a title contains (quotes, commas,
non-ASCII): the tokenizer can never merge a title's first token with the text before it.
Training, evaluation and the engine all build prompts here, so the pieces always match.

Layout of the ``list`` template (segment ids in brackets; 0 = template, never masked by
HatLLM)::

    [begin token, for a base that expects one] [0]
    HEAD [0]
    1. " [0]  <title 1> [1]  "\\n [0]
    ...
    n. " [0]  <title n> [n]  "\\n [0]
    n+1. " [0]
    <answer title> [n+1]  "\\n [0]          <- the answer, scored / generated

The answer is written exactly like a history item, so the prompt of every prefix of a
sequence is a prefix of the sequence's own list (:meth:`PromptBuilder.sequence`): one
forward pass over a window trains every title in it as the answer to the titles before it.
The ``instruct`` template (checkpoints made before the ``list`` one) ends the history with
TAIL and the answer with ``"`` and the end token instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from tokenizers import Tokenizer

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import PromptMeta

HEAD = "Here is a user's history of items, oldest first:\n"
TAIL = 'The next item the user will choose is "'
ITEM_OPEN = '{n}. "'
ITEM_CLOSE = '"\n'
ANSWER_CLOSE = '"'  # instruct template: the answer ends with this and the end token

Template = Literal["list", "instruct"]
TEMPLATES: tuple[Template, ...] = ("list", "instruct")


@dataclass(frozen=True)
class Encoded:
    """Token ids and their segment ids, both [T] int64."""

    ids: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class PromptBuilder:
    """Turns a history of titles into prompt tokens, and titles into answer tokens."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int, max_history: int = 20, template: Template = "list",
                 bos_id: int | None = None) -> None:
        if template not in TEMPLATES:
            raise InputError(f"prompt template {template!r}: expected one of {TEMPLATES}")
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.max_history = max_history
        self.template = template
        self._encode = lru_cache(maxsize=None)(self._encode_uncached)

    @classmethod
    def from_file(cls, tokenizer_json: Path, eos_token: str, max_history: int = 20, template: Template = "list",
                  bos_token: str | None = None) -> "PromptBuilder":
        tok = Tokenizer.from_file(str(tokenizer_json))
        ids = {}
        for role, token in (("end", eos_token), ("begin", bos_token)):
            ids[role] = tok.token_to_id(token) if token is not None else None
            if token is not None and ids[role] is None:
                raise InputError(f"{tokenizer_json}: {role} token {token!r} is not in the vocabulary")
        return cls(tok, ids["end"], max_history, template, ids["begin"])

    @classmethod
    def from_meta(cls, tokenizer_json: Path, prompt: PromptMeta) -> "PromptBuilder":
        """From a checkpoint's or bundle's ``prompt`` section (see :meth:`meta`)."""
        return cls.from_file(tokenizer_json, prompt.eos_token, prompt.max_history, prompt.template,  # type: ignore[arg-type]
                             prompt.bos_token)

    def meta(self) -> PromptMeta:
        """The ``prompt`` section that checkpoints and bundles carry."""
        bos = self.tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else None
        return PromptMeta(self.tokenizer.id_to_token(self.eos_id), self.max_history, self.template, bos)

    def with_max_history(self, max_history: int) -> "PromptBuilder":
        """The same prompts with another history length (0: the whole history)."""
        return PromptBuilder(self.tokenizer, self.eos_id, max_history, self.template, self.bos_id)  # type: ignore[arg-type]

    def _head(self) -> list[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + list(self._encode(HEAD))

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def title_ids(self, title: str) -> tuple[int, ...]:
        ids = self._encode(title)
        if not ids:
            raise InputError(f"title {title!r} encodes to no tokens")
        return ids

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The end marker after an answer title: the history item's close (list template), or
        the closing quote and the end token (instruct)."""
        if self.template == "list":
            return self._encode(ITEM_CLOSE)
        return self._encode(ANSWER_CLOSE) + (self.eos_id,)

    def _tail(self, items: int) -> tuple[int, ...]:
        return self._encode(ITEM_OPEN.format(n=items + 1) if self.template == "list" else TAIL)

    def prompt(self, history: Sequence[str]) -> Encoded:
        """The prompt for a history of titles (oldest first; only the last ``max_history``)."""
        history = list(history)[-self.max_history :] if self.max_history else list(history)
        ids: list[int] = self._head()
        segs: list[int] = [0] * len(ids)
        for n, title in enumerate(history, 1):
            for piece, seg in ((ITEM_OPEN.format(n=n), 0), (title, n), (ITEM_CLOSE, 0)):
                piece_ids = self._encode(piece)
                ids += piece_ids
                segs += [seg] * len(piece_ids)
        tail = self._tail(len(history))
        ids += tail
        segs += [0] * len(tail)
        return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(segs, dtype=np.int64))

    def answer_segment(self, prompt: Encoded) -> int:
        """The answer is an item of its own: the segment after the last history item."""
        return int(prompt.segments.max()) + 1

    def answer(self, title: str, segment: int) -> Encoded:
        """Answer tokens: the title (segment ``segment``) then the end marker (segment 0)."""
        title_ids, end = self.title_ids(title), self.end_ids
        return Encoded(
            np.asarray(title_ids + end, dtype=np.int64),
            np.asarray([segment] * len(title_ids) + [0] * len(end), dtype=np.int64),
        )

    def sequence(self, titles: Sequence[str]) -> tuple[Encoded, list[slice]]:
        """A whole window of titles as one list (list template), and for each title the span
        of its answer tokens (title and end marker). The tokens before span i are exactly
        ``prompt(titles[:i])`` and the span is ``answer(titles[i], i + 1)``, so one pass trains
        every title as the answer to the ones before it (``max_history`` is not applied)."""
        if self.template != "list":
            raise InputError("window training needs the 'list' prompt template")
        ids: list[int] = self._head()
        segs: list[int] = [0] * len(ids)
        spans = []
        for n, title in enumerate(titles, 1):
            head = self._encode(ITEM_OPEN.format(n=n))
            ids += head
            segs += [0] * len(head)
            start = len(ids)
            title_ids, end = self.title_ids(title), self.end_ids
            ids += title_ids + end
            segs += [n] * len(title_ids) + [0] * len(end)
            spans.append(slice(start, len(ids)))
        return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(segs, dtype=np.int64)), spans
