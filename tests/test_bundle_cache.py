"""Bundles built on first use: the cache key follows everything that changes the bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatllm_edge.app.models import bundle_cache_dir
from hatllm_edge.core import formats


def test_cache_key_follows_checkpoint_contract_and_graph_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HATLLM_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "checkpoint.json").write_text('{"a": 1}')
    first = bundle_cache_dir(ckpt, "int4")
    assert first == bundle_cache_dir(ckpt, "int4") and first.parent.parent == tmp_path / "cache"
    assert bundle_cache_dir(ckpt, "nf4") != first and bundle_cache_dir(ckpt, "nf4").parent == first.parent

    (ckpt / "notes.txt").write_text("not part of the model")
    assert bundle_cache_dir(ckpt, "int4") == first  # only model files count
    (ckpt / "checkpoint.json").write_text('{"a": 2}')
    retrained = bundle_cache_dir(ckpt, "int4")
    assert retrained != first

    monkeypatch.setattr(formats, "GRAPH_REVISION", formats.GRAPH_REVISION + 1)
    assert bundle_cache_dir(ckpt, "int4") != retrained
    monkeypatch.undo()
    monkeypatch.setenv("HATLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(formats, "GRAPH_CONTRACT", formats.GRAPH_CONTRACT + 1)
    assert bundle_cache_dir(ckpt, "int4") != retrained
