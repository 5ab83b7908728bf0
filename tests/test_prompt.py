"""Prompt segments with the real SmolLM2 tokenizer: every title's tokens carry exactly its
segment, whatever the title contains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SHIPPED_TOKENIZER

from hatllm_edge.core.formats import PromptMeta
from hatllm_edge.core.prompt import ANSWER_CLOSE, HEAD, ITEM_CLOSE, TAIL, PromptBuilder

TRICKY = [
    "Toy Story (1995)",
    "Misérables, Les (1995)",
    'He said "hi", then left',
    "Star Wars",
    "Kolya (1996)",
    "Ça (2017): “quoted” – dash",
    "Toy Story (1995)",  # the same item again: a segment of its own
]


def decode(prompts: PromptBuilder, ids: np.ndarray) -> str:
    return prompts.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def runs(segments: np.ndarray) -> list[int]:
    """The segment ids of the contiguous non-zero runs, in order."""
    out, prev = [], 0
    for s in segments.tolist():
        if s and s != prev:
            out.append(s)
        prev = s
    return out


def test_each_segment_decodes_to_exactly_its_title(prompts: PromptBuilder) -> None:
    p = prompts.prompt(TRICKY)
    assert p.ids.dtype == p.segments.dtype == np.int64 and len(p.ids) == len(p.segments) == len(p)
    assert runs(p.segments) == list(range(1, len(TRICKY) + 1))  # one contiguous run per title
    for n, title in enumerate(TRICKY, 1):
        ids = p.ids[p.segments == n]
        assert decode(prompts, ids) == title
        assert tuple(ids.tolist()) == prompts.title_ids(title)  # tokenised on its own


@pytest.fixture(scope="module")
def instruct(tokenizer_json: Path) -> PromptBuilder:
    return PromptBuilder.from_file(tokenizer_json, "<|im_end|>", max_history=20, template="instruct")


def test_list_template_layout(prompts: PromptBuilder) -> None:
    """The answer slot is the next list item: the prompt is the list with an open item."""
    p = prompts.prompt(TRICKY)
    n = len(TRICKY) + 1
    assert decode(prompts, p.ids) == HEAD + "".join(f'{i}. "{t}"\n' for i, t in enumerate(TRICKY, 1)) + f'{n}. "'
    template = "".join([HEAD, *(f'{i}. ""\n' for i in range(1, n)), f'{n}. "'])
    assert decode(prompts, p.ids[p.segments == 0]) == template
    assert prompts.end_ids == tuple(prompts.tokenizer.encode(ITEM_CLOSE, add_special_tokens=False).ids)


def test_instruct_template_layout(instruct: PromptBuilder) -> None:
    p = instruct.prompt(TRICKY)
    expected = HEAD + "".join(f'{n}. "{t}"\n' for n, t in enumerate(TRICKY, 1)) + TAIL
    assert decode(instruct, p.ids) == expected
    template = "".join([HEAD, *(f'{n}. ""\n' for n in range(1, len(TRICKY) + 1)), TAIL])
    assert decode(instruct, p.ids[p.segments == 0]) == template
    assert p.segments[: len(instruct.tokenizer.encode(HEAD, add_special_tokens=False).ids)].max() == 0
    assert (p.segments[-len(instruct.tokenizer.encode(TAIL, add_special_tokens=False).ids) :] == 0).all()


def test_repeated_item_is_two_segments(prompts: PromptBuilder) -> None:
    p = prompts.prompt(["Fargo (1996)", "Heat (1995)", "Fargo (1996)"])
    a, c = p.ids[p.segments == 1], p.ids[p.segments == 3]
    np.testing.assert_array_equal(a, c)
    assert decode(prompts, a) == "Fargo (1996)" and decode(prompts, p.ids[p.segments == 2]) == "Heat (1995)"
    assert prompts.answer_segment(p) == 4


def test_answer_segment_and_end_marker(prompts: PromptBuilder, instruct: PromptBuilder) -> None:
    for builder, close in ((prompts, ITEM_CLOSE), (instruct, '"<|im_end|>')):
        p = builder.prompt(TRICKY[:3])
        seg = builder.answer_segment(p)
        assert seg == 4
        a = builder.answer("Misérables, Les (1995)", seg)
        n = len(builder.title_ids("Misérables, Les (1995)"))
        assert a.segments.tolist() == [4] * n + [0] * len(builder.end_ids)
        assert decode(builder, a.ids[a.segments == 4]) == "Misérables, Les (1995)"
        assert decode(builder, a.ids[a.segments == 0]) == close
    assert instruct.end_ids == tuple(instruct.tokenizer.encode(ANSWER_CLOSE, add_special_tokens=False).ids) + (instruct.eos_id,)
    # prompt + answer reads as one text
    p = instruct.prompt(TRICKY[:3])
    a = instruct.answer("Misérables, Les (1995)", 4)
    assert decode(instruct, np.concatenate([p.ids, a.ids])).endswith(TAIL + 'Misérables, Les (1995)"<|im_end|>')


def test_sequence_is_every_prompt_and_its_answer(prompts: PromptBuilder) -> None:
    """The window layout: the tokens before title i are prompt(titles[:i]), its span is
    answer(titles[i]); the whole is the prompt of all the titles minus its open item."""
    encoded, spans = prompts.sequence(TRICKY)
    assert len(spans) == len(TRICKY)
    for i, span in enumerate(spans):
        p = prompts.prompt(TRICKY[:i])
        a = prompts.answer(TRICKY[i], prompts.answer_segment(p))
        assert encoded.ids[: span.start].tolist() == p.ids.tolist() and encoded.segments[: span.start].tolist() == p.segments.tolist()
        assert encoded.ids[span].tolist() == a.ids.tolist() and encoded.segments[span].tolist() == a.segments.tolist()
    full = prompts.prompt(TRICKY)
    assert full.ids[: len(encoded)].tolist() == encoded.ids.tolist()


def test_sequence_needs_the_list_template(instruct: PromptBuilder) -> None:
    with pytest.raises(ValueError, match="list"):
        instruct.sequence(TRICKY)


def test_meta_round_trip(tokenizer_json: Path, prompts: PromptBuilder, instruct: PromptBuilder) -> None:
    for builder in (prompts, instruct):
        again = PromptBuilder.from_meta(tokenizer_json, builder.meta())
        assert (again.template, again.max_history, again.eos_id) == (builder.template, builder.max_history, builder.eos_id)
    # a checkpoint written before templates existed was made with the instruct one
    legacy = PromptBuilder.from_meta(tokenizer_json, PromptMeta.parse({"eos_token": "<|im_end|>", "max_history": 10}, "meta"))
    assert legacy.template == "instruct"
    with pytest.raises(ValueError, match="template"):
        PromptBuilder.from_meta(tokenizer_json, PromptMeta("<|im_end|>", 10, "chat"))


def test_begin_token_opens_every_prompt_and_travels_in_the_meta(tokenizer_json: Path, prompts: PromptBuilder) -> None:
    """A base whose tokenizer prepends a begin token (Gemma) gets it first in every prompt and
    window, as template (segment 0); a section without one builds exactly what it always did."""
    meta = prompts.meta()
    assert meta.bos_token is None and "bos_token" not in meta.to_dict()
    raw = meta.to_dict() | {"bos_token": "<|im_start|>"}
    begun = PromptBuilder.from_meta(tokenizer_json, PromptMeta.parse(raw, "meta"))
    bos = begun.bos_id
    assert bos is not None and begun.meta().to_dict() == raw
    for plain, with_bos in ((prompts.prompt(TRICKY), begun.prompt(TRICKY)),
                            (prompts.sequence(TRICKY)[0], begun.sequence(TRICKY)[0])):
        assert with_bos.ids.tolist() == [bos] + plain.ids.tolist()
        assert with_bos.segments.tolist() == [0] + plain.segments.tolist()
    spans, shifted = prompts.sequence(TRICKY)[1], begun.sequence(TRICKY)[1]
    assert [(s.start + 1, s.stop + 1) for s in spans] == [(s.start, s.stop) for s in shifted]
    assert begun.with_max_history(0).bos_id == bos
    with pytest.raises(ValueError, match="begin token"):
        PromptBuilder.from_meta(tokenizer_json, PromptMeta.parse(meta.to_dict() | {"bos_token": "<nope>"}, "meta"))
    with pytest.raises(ValueError, match="bos_token"):
        PromptMeta.parse(meta.to_dict() | {"bos_token": 2}, "meta")


def test_empty_history(prompts: PromptBuilder, instruct: PromptBuilder) -> None:
    p = prompts.prompt([])
    assert (p.segments == 0).all() and decode(prompts, p.ids) == HEAD + '1. "'
    assert prompts.answer_segment(p) == 1
    assert decode(instruct, instruct.prompt([]).ids) == HEAD + TAIL


def test_max_history_keeps_the_most_recent(tokenizer_json: Path) -> None:
    short = PromptBuilder.from_file(tokenizer_json, "<|im_end|>", max_history=3)
    history = ["A (1990)", "B (1991)", "C (1992)", "D (1993)", "E (1994)"]
    p = short.prompt(history)
    assert runs(p.segments) == [1, 2, 3]
    assert [decode(short, p.ids[p.segments == n]) for n in (1, 2, 3)] == history[-3:]
    assert decode(short, p.ids).startswith(HEAD + '1. "C (1992)"\n2. "D (1993)"')
    assert short.answer_segment(p) == 4


def test_bad_titles_and_eos(tokenizer_json: Path, prompts: PromptBuilder) -> None:
    with pytest.raises(ValueError, match="encodes to no tokens"):
        prompts.title_ids("")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        PromptBuilder.from_file(tokenizer_json, "<no-such-token>")


def test_the_shipped_tokenizer_is_the_one_in_the_gguf(hf_tokenizer: Any, tmp_path: Path) -> None:
    """The engine's tests read models/hatllm-ml100k/tokenizer.json; it must be what the base
    model's GGUF tokenizer saves."""
    path = tmp_path / "tokenizer.json"
    hf_tokenizer.backend_tokenizer.save(str(path))
    assert json.loads(path.read_text()) == json.loads(SHIPPED_TOKENIZER.read_text())
