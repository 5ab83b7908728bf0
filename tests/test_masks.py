"""The IN/OR/CR masks, spelled out by hand for one small layout, and the layer schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hatllm_edge.core.masks import (
    MASK_KINDS,
    LayerSchedule,
    build_masks,
    causal_visibility,
    left_padded,
    packed_visibility,
    padded_positions,
)

# Template (0), item 1, item 1, template, item 2, item 2, template, answer item 3, answer item 3.
SEGS = [0, 1, 1, 0, 2, 2, 0, 3, 3]


def rows(*lines: str) -> np.ndarray:
    return np.array([[c == "1" for c in line] for line in lines], dtype=bool)


# Row = query token, column = key token; 1 = may attend.
OR = rows(
    "100000000",
    "110000000",
    "111000000",
    "111100000",
    "111110000",
    "111111000",
    "111111100",
    "111111110",
    "111111111",
)
IN = rows(
    "100000000",  # template: everything causal
    "110000000",  # item 1: template + itself
    "111000000",  # item 1: template + earlier item-1 token + itself
    "111100000",  # template: never restricted
    "100110000",  # item 2: not item 1's tokens
    "100111000",
    "111111100",  # template
    "100100110",  # answer (item 3): template tokens and its own tokens only
    "100100111",
)
CR = rows(
    "100000000",
    "110000000",  # item 1, first token: template + itself
    "101000000",  # item 1, second token: not the first token of item 1, but itself
    "111100000",
    "111110000",  # item 2 sees item 1 and the template
    "111101000",  # ... but not item 2's first token
    "111111100",
    "111111110",  # answer sees every history item
    "111111101",  # ... but not its own earlier token
)
HAND = {"in": IN, "or": OR, "cr": CR}


def masks_for(segs: list[list[int]], key_valid: list[list[bool]] | None = None, q: int | None = None, xp=np):
    seg = xp.asarray(np.array(segs, dtype=np.int64))
    valid = np.ones(seg.shape, dtype=bool) if key_valid is None else np.array(key_valid, dtype=bool)
    q = q or seg.shape[1]
    return build_masks(seg[:, -q:], seg, causal_visibility(xp.asarray(valid), q))


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_hand_written_matrices(kind: str) -> None:
    m = masks_for([SEGS])[kind]
    assert m.shape == (1, 1, 9, 9) and m.dtype == bool
    np.testing.assert_array_equal(m[0, 0], HAND[kind])


def test_every_token_sees_itself_and_masks_are_causal() -> None:
    rng = np.random.default_rng(0)
    segs = rng.integers(0, 4, (3, 12))
    for m in masks_for(segs.tolist()).values():
        assert m[:, 0].diagonal(axis1=1, axis2=2).all()
        assert not (m[:, 0] & np.triu(np.ones((12, 12), bool), 1)).any()  # never a later key


def test_in_and_cr_partition_the_causal_mask() -> None:
    """Every causal pair is allowed by IN or by CR; both allow exactly the non-item pairs and self."""
    rng = np.random.default_rng(1)
    segs = rng.integers(0, 4, (4, 15))
    m = masks_for(segs.tolist())
    np.testing.assert_array_equal(m["in"] | m["cr"], m["or"])
    sq, sk = segs[:, None, :, None], segs[:, None, None, :]
    free = (sq == 0) | (sk == 0) | np.eye(15, dtype=bool)
    np.testing.assert_array_equal(m["in"] & m["cr"], m["or"] & free)


def test_non_item_tokens_never_restricted() -> None:
    m = masks_for([SEGS])
    template_rows = [i for i, s in enumerate(SEGS) if s == 0]
    template_cols = template_rows
    for kind in MASK_KINDS:
        np.testing.assert_array_equal(m[kind][0, 0, template_rows], OR[template_rows])  # they see everything
        np.testing.assert_array_equal(m[kind][0, 0][:, template_cols], OR[:, template_cols])  # and are seen


def test_left_padding() -> None:
    """Padding keys are seen by no real token; each padding row sees only itself."""
    m = masks_for([[0, 0] + SEGS], [[False, False] + [True] * 9])
    for kind in MASK_KINDS:
        got = m[kind][0, 0]
        np.testing.assert_array_equal(got[2:, 2:], HAND[kind])
        assert not got[2:, :2].any()
        np.testing.assert_array_equal(got[:2], np.eye(2, 11, dtype=bool))


def test_right_padding() -> None:
    m = masks_for([SEGS + [0, 0]], [[True] * 9 + [False, False]])
    for kind in MASK_KINDS:
        got = m[kind][0, 0]
        np.testing.assert_array_equal(got[:9, :9], HAND[kind])
        assert not got[:9, 9:].any()
        # padding rows (segment 0): all real keys, themselves, never the other padding key
        np.testing.assert_array_equal(got[9], [True] * 9 + [True, False])
        np.testing.assert_array_equal(got[10], [True] * 9 + [False, True])


def test_batch_rows_are_independent() -> None:
    other = [0, 1, 0, 1, 2, 2, 2, 0, 3]
    m = masks_for([SEGS, other])
    single = masks_for([other])
    for kind in MASK_KINDS:
        np.testing.assert_array_equal(m[kind][0, 0], HAND[kind])
        np.testing.assert_array_equal(m[kind][1], single[kind][0])


@pytest.mark.parametrize("q", [1, 2, 4, 9])
def test_kv_cache_queries_are_the_last_keys(q: int) -> None:
    full = masks_for([SEGS])
    step = masks_for([SEGS], q=q)
    for kind in MASK_KINDS:
        assert step[kind].shape == (1, 1, q, 9)
        np.testing.assert_array_equal(step[kind][0, 0], HAND[kind][-q:])
        np.testing.assert_array_equal(step[kind], full[kind][:, :, -q:])


def test_kv_cache_with_left_padding() -> None:
    segs, valid = [[0, 0] + SEGS], [[False, False] + [True] * 9]
    full = masks_for(segs, valid)
    step = masks_for(segs, valid, q=3)
    for kind in MASK_KINDS:
        np.testing.assert_array_equal(step[kind], full[kind][:, :, -3:])


def test_causal_visibility() -> None:
    valid = np.array([[False, True, True, True]])
    np.testing.assert_array_equal(causal_visibility(valid, 4)[0], rows("0000", "0100", "0110", "0111"))
    np.testing.assert_array_equal(causal_visibility(valid, 2)[0], rows("0110", "0111"))


def test_numpy_and_torch_agree() -> None:
    rng = np.random.default_rng(2)
    segs = rng.integers(0, 5, (3, 10))
    valid = np.ones((3, 10), bool)
    valid[1, :3] = False
    valid[2, 8:] = False
    for q in (10, 4, 1):
        a = build_masks(segs[:, -q:], segs, causal_visibility(valid, q))
        ts = torch.from_numpy(segs)
        b = build_masks(ts[:, -q:], ts, causal_visibility(torch.from_numpy(valid), q))
        for kind in MASK_KINDS:
            assert isinstance(b[kind], torch.Tensor) and b[kind].dtype == torch.bool
            np.testing.assert_array_equal(a[kind], b[kind].numpy())


def test_only_requested_kinds_and_unknown_kind() -> None:
    seg = np.array([SEGS])
    vis = causal_visibility(np.ones((1, 9), bool), 9)
    assert set(build_masks(seg, seg, vis, kinds=["cr"])) == {"cr"}
    with pytest.raises(ValueError, match="unknown mask kind"):
        build_masks(seg, seg, vis, kinds=["xx"])


@pytest.mark.parametrize(
    "layers,n_in,n_cr,kinds",
    [
        (5, 2, 1, ["in", "in", "or", "or", "cr"]),
        (3, 0, 0, ["or", "or", "or"]),
        (3, 3, 0, ["in", "in", "in"]),
        (2, 0, 2, ["cr", "cr"]),
        (4, 2, 2, ["in", "in", "cr", "cr"]),
    ],
)
def test_layer_schedule_kinds(layers: int, n_in: int, n_cr: int, kinds: list[str]) -> None:
    s = LayerSchedule(layers, n_in, n_cr)
    assert s.kinds == kinds
    assert s.to_dict() == {"num_layers": layers, "n_in": n_in, "n_cr": n_cr}
    assert LayerSchedule(**s.to_dict()) == s


@pytest.mark.parametrize("layers,n_in,n_cr", [(4, 3, 2), (2, 0, 3), (3, -1, 0), (3, 0, -1), (-1, 0, 0)])
def test_layer_schedule_rejects(layers: int, n_in: int, n_cr: int) -> None:
    with pytest.raises(ValueError, match="n_in"):
        LayerSchedule(layers, n_in, n_cr)



def test_left_padding_puts_every_last_token_in_the_last_column() -> None:
    rows = [(np.array([5, 6, 7]), np.array([0, 1, 1])), (np.array([9]), np.array([2]))]
    ids, segs, valid = left_padded(rows)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and segs.tolist() == [[0, 1, 1], [0, 0, 2]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert padded_positions(valid).tolist() == [[0, 1, 2], [0, 0, 0]]
    wide, _, wide_valid = left_padded(rows, width=5)
    assert wide.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 9]] and padded_positions(wide_valid).tolist() == [[0, 0, 0, 1, 2], [0] * 5]


def test_packed_rows_see_the_prompt_and_their_own_candidate_only() -> None:
    """Two candidates packed in one row after a 3-token prompt whose first token is padding:
    candidate 0 has 2 tokens, candidate 1 has 1, and the last column is padding (-1)."""
    visible = packed_visibility(np.array([[False, True, True]]), np.array([[0, 0, 1, -1]]))
    prompt, fed = visible[0, :, :3], visible[0, :, 3:]
    assert visible.shape == (1, 4, 7) and (prompt == [False, True, True]).all()
    assert fed.tolist() == [[True, False, False, False], [True, True, False, False],
                            [False, False, True, False], [False, False, False, False]]
