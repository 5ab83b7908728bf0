"""Item references (catalog ids or exact titles) -> catalog indices. Every reference that is
not in the catalog is reported at once, each with the catalog titles nearest to it, so a user
fixes a request in one go instead of one typo per try."""

from __future__ import annotations

import difflib
import reprlib
import unicodedata
from typing import Any, Sequence

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.limits import MAX_REF_CHARS

SUGGESTIONS = 3  # nearest titles offered per unknown reference
SUGGESTED_REFS = 20  # unknown references that get suggestions (the rest are listed, not searched)


def loose(text: str) -> str:
    """``text`` up to case, whitespace and Unicode form: NFKC, casefolded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def show(value: Any, limit: int = 60) -> str:
    """A value as a short repr for an error message (a request may hold megabytes)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 4, 4, 2
    return r.repr(value)


class Resolver:
    """One catalog's lookup tables: ids, exact titles (the first of duplicates), loose forms."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._titles: dict[str, int] = {}
        for i, title in enumerate(catalog.titles):
            self._titles.setdefault(title, i)
        self._loose: dict[str, str] | None = None
        self._folded: list[str] | None = None

    def lookup(self, ref: Any) -> int | None:
        """The catalog index of one reference (an id, else an exact title), or None."""
        if isinstance(ref, bool) or not isinstance(ref, (str, int)):
            return None
        key = str(ref).strip()
        if key in self.catalog:
            return self.catalog.index(key)
        return self._titles.get(key)

    def nearest(self, ref: str) -> list[str]:
        """The catalog's titles nearest to ``ref``: the one equal up to case, spacing and Unicode
        form if there is one, else up to :data:`SUGGESTIONS` by similarity of their loose forms."""
        if self._loose is None:
            self._loose = {}
            for text in (*self.catalog.titles, *self.catalog.item_ids):
                self._loose.setdefault(loose(text), text)
            self._folded = [loose(t) for t in self.catalog.titles]
        key = loose(ref)
        if key in self._loose:
            return [self._loose[key]]
        close = difflib.get_close_matches(key, self._folded or [], n=SUGGESTIONS, cutoff=0.6)
        return [self._loose[c] for c in close]

    def problems(self, refs: Sequence[Any], where: str, suggest: int = SUGGESTED_REFS) -> tuple[list[int], list[str]]:
        """(catalog indices of the references found, one message per reference that is not);
        the first ``suggest`` unknown ones come with their nearest titles."""
        found, problems = [], []
        for n, ref in enumerate(refs):
            index = self.lookup(ref)
            if index is not None:
                found.append(index)
                continue
            if isinstance(ref, bool) or not isinstance(ref, (str, int)):
                problems.append(f"{where}[{n}]: expected an item id or title (string or integer), got {show(ref)}")
                continue
            if len(str(ref)) > MAX_REF_CHARS:
                problems.append(f"{where}[{n}]: {show(ref)} has {len(str(ref)):,} characters; an item id or title has at most "
                                f"{MAX_REF_CHARS}")
                continue
            hint = ""
            if len(problems) < suggest:
                near = self.nearest(str(ref))
                hint = (f" (did you mean {near[0]!r}?)" if len(near) == 1 else
                        f" (nearest titles: {', '.join(repr(t) for t in near)})" if near else "")
            problems.append(f"{where}[{n}]: {show(ref)} is neither an item id nor an exact title in the catalog{hint}")
        return found, problems

    def resolve(self, refs: Sequence[Any], where: str) -> list[int]:
        """Catalog indices of ``refs``; an :class:`InputError` naming every reference not found."""
        found, problems = self.problems(refs, where)
        if problems:
            raise InputError(joined(problems))
        return found


def joined(problems: Sequence[str]) -> str:
    """Several problems as one message: how many, then each."""
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
