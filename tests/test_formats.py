"""The metadata records: the shipped model's hatllm.json reads and writes back byte for byte,
unknown keys survive, and each malformed section is refused with its name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hatllm_edge.app.models import default_checkpoint
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import Decoding, ModelMeta, PromptMeta

SHIPPED = default_checkpoint() / "hatllm.json"
MINIMAL = {"schedule": {"num_layers": 2, "n_in": 1, "n_cr": 1}, "prompt": {"eos_token": "<|im_end|>", "max_history": 5}}


def test_shipped_metadata_round_trips(tmp_path: Path) -> None:
    meta = ModelMeta.read(SHIPPED)
    assert meta.prompt == PromptMeta("<eos>", 20, "list", "<bos>") and meta.finetune == "lora"
    assert isinstance(meta.decoding, Decoding) and meta.decoding.assistant_weight > 0
    meta.write(tmp_path / "hatllm.json")
    assert (tmp_path / "hatllm.json").read_text(encoding="utf-8") == SHIPPED.read_text(encoding="utf-8")


def test_shortlist_round_trips(tmp_path: Path) -> None:
    meta = ModelMeta.parse({**MINIMAL, "decoding": {"renormalise": True, "assistant_weight": 16, "shortlist": 50}}, "m")
    assert meta.decoding == Decoding(True, 16.0, None, 50)
    meta.write(tmp_path / "m.json")
    assert ModelMeta.read(tmp_path / "m.json").decoding.shortlist == 50  # type: ignore[union-attr]
    assert ModelMeta.parse({**MINIMAL, "decoding": {"assistant_weight": 16}}, "m").decoding.shortlist == 0  # type: ignore[union-attr]


def test_mixture_round_trips(tmp_path: Path) -> None:
    meta = ModelMeta.parse({**MINIMAL, "decoding": {"renormalise": True, "assistant_weight": 0.9, "shortlist": 10, "mixture": True}}, "m")
    assert meta.decoding == Decoding(True, 0.9, None, 10, True)
    meta.write(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["decoding"]["mixture"] is True
    assert ModelMeta.read(tmp_path / "m.json").decoding == meta.decoding
    product = ModelMeta.parse({**MINIMAL, "decoding": {"assistant_weight": 16, "shortlist": 10}}, "m").decoding
    assert product is not None and not product.mixture and "mixture" not in product.to_dict()  # older files read back unchanged


def test_defaults_and_unknown_keys(tmp_path: Path) -> None:
    meta = ModelMeta.parse({**MINIMAL, "future": {"x": 1}}, "m")
    assert meta.prompt.template == "instruct"  # written before templates were named
    assert meta.decoding is None and meta.export is None and meta.extra == {"future": {"x": 1}}
    meta.write(tmp_path / "m.json")
    again = ModelMeta.read(tmp_path / "m.json")
    assert again == meta and json.loads((tmp_path / "m.json").read_text())["future"] == {"x": 1}
    assert not list(tmp_path.glob(".*"))  # the temporary file was renamed into place


@pytest.mark.parametrize(("change", "section"), [
    ({"schedule": {"num_layers": 2, "n_in": 1}}, "schedule"),
    ({"schedule": {"num_layers": "2", "n_in": 1, "n_cr": 1}}, "schedule"),
    ({"prompt": {"max_history": 5}}, "prompt"),
    ({"prompt": {"eos_token": "e", "max_history": -1}}, "prompt"),
    ({"prompt": "list"}, "prompt"),
    ({"finetune": "qlora"}, "finetune"),
    ({"decoding": {"assistant_weight": -1}}, "decoding"),
    ({"decoding": {"renormalise": "yes"}}, "decoding"),
    ({"decoding": {"assistant_weight": 16, "shortlist": -1}}, "decoding"),
    ({"decoding": {"assistant_weight": 16, "shortlist": "50"}}, "decoding"),
    ({"decoding": {"renormalise": True, "assistant_weight": 16, "shortlist": 10, "mixture": True}}, "decoding"),  # a share is below 1
    ({"decoding": {"renormalise": True, "assistant_weight": 0.9, "mixture": True}}, "decoding"),  # a mixture ranks a shortlist
    ({"decoding": {"renormalise": True, "assistant_weight": 0.9, "shortlist": 10, "mixture": "yes"}}, "decoding"),
    ({"decoding": {"renormalise": False, "assistant_weight": 0.9, "shortlist": 10, "mixture": True}}, "decoding"),  # raw scores
    ({"export": []}, "export"),
])
def test_malformed_sections_are_named(change: dict, section: str) -> None:
    with pytest.raises(InputError, match=rf"where\.json: {section}"):
        ModelMeta.parse({**MINIMAL, **change}, "where.json")


def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json is not readable JSON"):
        ModelMeta.read(tmp_path / "bad.json")
    with pytest.raises(InputError, match="expected a JSON object"):
        ModelMeta.parse([1], "x")
