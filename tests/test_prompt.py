"""Prompt segments with the real SmolLM2 tokenizer: every title's tokens carry exactly its
segment, whatever the title contains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hatllm_edge.prompt import ANSWER_CLOSE, HEAD, TAIL, PromptBuilder

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


def test_template_layout(prompts: PromptBuilder) -> None:
    p = prompts.prompt(TRICKY)
    expected = HEAD + "".join(f'{n}. "{t}"\n' for n, t in enumerate(TRICKY, 1)) + TAIL
    assert decode(prompts, p.ids) == expected
    template = "".join([HEAD, *(f'{n}. ""\n' for n in range(1, len(TRICKY) + 1)), TAIL])
    assert decode(prompts, p.ids[p.segments == 0]) == template
    assert p.segments[: len(prompts.tokenizer.encode(HEAD, add_special_tokens=False).ids)].max() == 0
    assert (p.segments[-len(prompts.tokenizer.encode(TAIL, add_special_tokens=False).ids) :] == 0).all()


def test_repeated_item_is_two_segments(prompts: PromptBuilder) -> None:
    p = prompts.prompt(["Fargo (1996)", "Heat (1995)", "Fargo (1996)"])
    a, c = p.ids[p.segments == 1], p.ids[p.segments == 3]
    np.testing.assert_array_equal(a, c)
    assert decode(prompts, a) == "Fargo (1996)" and decode(prompts, p.ids[p.segments == 2]) == "Heat (1995)"
    assert prompts.answer_segment(p) == 4


def test_answer_segment_and_end_marker(prompts: PromptBuilder) -> None:
    p = prompts.prompt(TRICKY[:3])
    seg = prompts.answer_segment(p)
    assert seg == 4
    a = prompts.answer("Misérables, Les (1995)", seg)
    n = len(prompts.title_ids("Misérables, Les (1995)"))
    assert a.segments.tolist() == [4] * n + [0] * len(prompts.end_ids)
    assert decode(prompts, a.ids[a.segments == 4]) == "Misérables, Les (1995)"
    assert prompts.end_ids == tuple(prompts.tokenizer.encode(ANSWER_CLOSE, add_special_tokens=False).ids) + (prompts.eos_id,)
    assert prompts.end_ids[-1] == prompts.tokenizer.token_to_id("<|im_end|>")
    assert decode(prompts, a.ids[a.segments == 0]) == '"<|im_end|>'
    # prompt + answer reads as one text
    assert decode(prompts, np.concatenate([p.ids, a.ids])).endswith(TAIL + 'Misérables, Les (1995)"<|im_end|>')


def test_empty_history(prompts: PromptBuilder) -> None:
    p = prompts.prompt([])
    assert (p.segments == 0).all() and decode(prompts, p.ids) == HEAD + TAIL
    assert prompts.answer_segment(p) == 1


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
